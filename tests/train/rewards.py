"""Reward functions the GRPO tests name as ``objective.grpo.reward=tests.train.rewards:<name>``."""


def the_share(prompt, completion, row):
    """The share of the completion's words that are "the" (a preference a tiny model can learn fast)."""
    words = completion.split()
    return words.count("the") / max(len(words), 1)


def not_a_number(prompt, completion, row):
    return "high"


def raises(prompt, completion, row):
    raise RuntimeError(f"cannot score row {row['id']}")


NOT_CALLABLE = 3


def words(prompt, completion, row):
    """A tenth of the completion's word count (varies among random completions)."""
    return len(completion.split()) / 10
