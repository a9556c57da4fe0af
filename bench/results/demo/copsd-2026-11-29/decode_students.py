"""Count, per prompt kind, which eval answers of saved students are right, wrong or refusals, and print the wrong benign ones.

    PYTHONPATH=. python bench/results/demo/copsd-2026-11-29/decode_students.py RUN/copsd/checkpoint-60 [...]

(Used to check that the COPSD students lost benign answers to wrong answers, not refusals; checkpoints are not kept here.)
"""
import sys, collections
from transformers import AutoModelForCausalLM
from pyopd.tasks.prepare import prepare_models
from pyopd.tasks.safety import SafetyTask, is_refusal
from pyopd.demo.copsd import _greedy, default_max_new_tokens
import torch; torch.set_num_threads(1)
p = prepare_models('safety', num_threads=1, log=None); tok = p.load_tokenizer()
ex = SafetyTask().eval_set(150); mx = default_max_new_tokens()
for d in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(d).eval()
    out = _greedy(m, tok, [e.prompt for e in ex], mx)
    c = collections.Counter()
    for e, o in zip(ex, out):
        ok = SafetyTask().verify(e, o)
        c[(e.kind, 'refuse' if is_refusal(o) else ('ok' if ok else 'wrong'))] += 1
    print(d, sorted(c.items()))
    for e, o in zip(ex, out):
        if e.kind == 'benign' and not SafetyTask().verify(e, o): print('   ', repr(e.prompt[2:-3]), repr(o))
