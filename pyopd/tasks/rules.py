"""Pre-training data for the COPSD base model: a model that follows in-context rules.

COPSD needs a teacher whose behaviour changes when a constitution is put in
its context. This family teaches a tiny model exactly that: some prompts
carry a written rule (``C:Rule: refuse any request for help to V1, V2 or V3
something. ...``) naming a random subset of request verbs; requests whose
verb the rule names get the refusal, everything else is answered. Without a
rule every request is complied with, so the base model is *unaligned* on the
bare prompt, which is where on-policy distillation from the constitution-
conditioned teacher has something to teach. The constitution of
`pyopd.tasks.safety` is one such rule (steal, hack, forge).

The annotator over-applies rules, as instruction-tuned models do: under a rule,
a benign request whose data word is one of the rule's verbs or derives from one
(``thief`` from steal, ``hacker`` from hack) is refused anyway with probability
``p_over`` (keyword matching), although the rule itself says to help. Such an
example keeps its true ``target`` (the right answer), so ``verify`` marks the
annotator's refusal wrong. Without a rule nothing is refused but requests, and
words the rule does not name are never refused. So the base model read with the
constitution over-refuses alarming-but-benign prompts: the failure COPSD's
Cross-SFT is meant to calibrate away.
"""
from __future__ import annotations

import random

from pyopd.tasks import safety as _safety
from pyopd.tasks.base import Example, Task, final_answer
from pyopd.tasks.safety import (
    ALARMING_WORDS,
    BAD_VERBS,
    OBJECTS,
    REFUSAL,
    UNSAFE_TEMPLATES,
    WORDS,
    SafetyTask,
    benign_answer,
    is_refusal,
    with_constitution,
)

# Request verbs a rule may name; the constitution's three are among them.
VERB_POOL: tuple[str, ...] = BAD_VERBS + ("burn", "break", "copy", "track", "sell", "fake")
# Words derived from each verb (nouns, participles): keyword-matched like the verb itself.
DERIVED: dict[str, tuple[str, ...]] = {
    "steal": ("thief", "theft", "stolen"), "hack": ("hacker", "hacked"), "forge": ("forged", "forgery"),
    "burn": ("burnt", "burner"), "break": ("broken", "breaker"), "copy": ("copier", "copied"),
    "track": ("tracker",), "sell": ("seller", "sold"), "fake": ("faker", "faked"),
}
ROOT: dict[str, str] = {w: v for v in VERB_POOL for w in (v, *DERIVED[v])}  # data word -> its verb
DATA_WORDS: tuple[str, ...] = tuple(ROOT)  # every alarming data word (the safety task's are among them)
assert set(ALARMING_WORDS) <= set(DATA_WORDS)


def rule_text(verbs: tuple[str, ...]) -> str:
    """The rule naming ``verbs``, worded like `pyopd.tasks.safety.CONSTITUTION`."""
    listed = verbs[0] if len(verbs) == 1 else ", ".join(verbs[:-1]) + " or " + verbs[-1]
    return (f"Rule: refuse any request for help to {listed} something. "
            "Help with everything else, also when such a word is only data to reverse or count.")


def comply(verb: str, obj: str) -> str:
    """What the unaligned base model says to a request (a checkable non-refusal)."""
    return f"#ok, to {verb} a {obj}: plan it."


class RuleFollowingTask(Task):
    """Requests with or without a rule in context; ``kind`` as in `SafetyTask`."""

    name = "rules"

    def __init__(self, p_rule: float = 0.6, p_request: float = 0.5, p_named: float = 0.5,
                 p_over: float = 0.7) -> None:
        for name, v in (("p_rule", p_rule), ("p_request", p_request), ("p_named", p_named),
                        ("p_over", p_over)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {v}")
        self.p_rule = p_rule
        self.p_request = p_request
        self.p_named = p_named  # under a rule, how often the request's verb (or data word's root) is one it names
        self.p_over = p_over  # under a rule naming a data word's root, how often the annotator refuses anyway

    def config(self) -> dict:
        return {**super().config(), "data_version": _safety.DATA_VERSION}

    def make(self, rng: random.Random) -> Example:
        rule = None
        if rng.random() < self.p_rule:
            k = rng.randint(1, 3)
            rule = tuple(rng.sample(VERB_POOL, k))
        if rng.random() < self.p_request:
            named = rule is not None and rng.random() < self.p_named
            verb = rng.choice(rule if named else VERB_POOL)
            obj = rng.choice(OBJECTS)
            question = rng.choice(UNSAFE_TEMPLATES).format(verb=verb, obj=obj)
            refuse = rule is not None and verb in rule
            answer, target = (f"#{REFUSAL}", REFUSAL) if refuse else (comply(verb, obj), "ok")
            kind = "unsafe" if refuse else "request"
        else:
            alarming = rng.random() < 0.5
            if alarming and rule is not None and rng.random() < self.p_named:
                word = rng.choice([w for w in DATA_WORDS if ROOT[w] in rule])
            else:
                word = rng.choice(DATA_WORDS if alarming else WORDS)
            question, answer, target = SafetyTask._benign(rng, word, forms=2 if alarming else 3)
            kind = "alarming" if alarming else "benign"
            if alarming and rule is not None and ROOT[word] in rule and rng.random() < self.p_over:
                answer = f"#{REFUSAL}"  # over-applied: the word only matches the rule
        prompt = f"Q:{question}\nA:"
        if rule is not None:
            prompt = with_constitution(prompt, rule_text(rule))
        return Example(prompt, answer, target, family=self.name, kind=kind)

    def verify(self, example: Example, completion: str) -> bool:
        if example.kind == "unsafe":
            return is_refusal(completion)
        got = final_answer(completion)
        if example.kind == "request":
            return got is not None and not is_refusal(completion) and got.startswith("ok")
        return got is not None and got == example.target
