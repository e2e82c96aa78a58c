"""Local lm-evaluation-harness tasks for the harness tests: YAML over JSON-lines files, no hub."""

from __future__ import annotations

import json

import numpy as np

# task -> what it exercises
TASKS = {"local_mc": "multiple_choice: loglikelihood, acc and acc_norm",
         "local_gen": "generate_until: greedy, stopped at a newline or a full stop; exact_match",
         "local_ppl": "loglikelihood_rolling over texts longer than 256 positions; perplexities"}

WORDS = ("red green blue river mountain paper seven eleven quietly moves under bright cold stone over the a of "
         "and to is was").split()


def local_tasks(tmp_path):
    """A directory of three lm-eval task YAML files over local JSON lines (see TASKS)."""
    rng = np.random.default_rng(0)
    mc = [{"question": " ".join(rng.choice(WORDS, 6)), "choices": [" ".join(rng.choice(WORDS, int(k)))
                                                                     for k in rng.integers(1, 4, 4)],
           "label": int(rng.integers(0, 4))} for _ in range(12)]
    gen = [{"question": " ".join(rng.choice(WORDS, 5)), "answer": " ".join(rng.choice(WORDS, 2))} for _ in range(6)]
    gen[0]["answer"] = ""  # a case exact_match can hit with a random model: an immediate newline or nothing
    ppl = [{"text": " ".join(rng.choice(WORDS, int(n)))} for n in (30, 300, 520)]
    d = tmp_path / "tasks"
    d.mkdir()
    for name, rows in (("mc", mc), ("gen", gen), ("ppl", ppl)):
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (d / "mc.yaml").write_text(common + f"""task: local_mc
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (d / "gen.yaml").write_text(common + f"""task: local_gen
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
output_type: generate_until
doc_to_text: "{{{{question}}}} ="
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (d / "ppl.yaml").write_text(common + f"""task: local_ppl
dataset_kwargs:
  data_files:
    test: {d / 'ppl.jsonl'}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return d
