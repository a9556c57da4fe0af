"""Tests for pyopd.tasks: tokenizer, task families, verifiers and the model cache."""
from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path

import pytest
import torch

from pyopd.tasks import (
    ArithmeticTask,
    Example,
    MixedTask,
    StringTask,
    build_tokenizer,
    final_answer,
    get_task,
    prepare_models,
)
from pyopd.tasks import prepare as prep
from pyopd.tasks.recipe import generate, sft_batch
from pyopd.tasks.safety import REFUSAL, SafetyTask, is_refusal, safety_report, with_constitution
from pyopd.tasks.tokenizer import VOCAB_SIZE

FAMILIES = [
    ArithmeticTask(),
    ArithmeticTask(min_ops=1, max_ops=4, allow_negative=True),
    StringTask(),
    StringTask(min_len=1, max_len=9, n_letters=26),
    MixedTask(),
    SafetyTask(),
]


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_fixed_ids_and_specials() -> None:
    tok = build_tokenizer()
    assert len(tok) == VOCAB_SIZE < 128
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "left"
    ids = tok("Q:1+2=?\nA:")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("Q:1+2=?\nA:")
    assert tok.eos_token_id not in ids


def test_tokenizer_decode_roundtrip_all_chars() -> None:
    tok = build_tokenizer()
    text = "".join(chr(c) for c in range(32, 127)) + "\n  x\ny "
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]


def test_tokenizer_save_load_roundtrip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left"
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    text = "Q:count a in banana\nA:ba1na2na3#3"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_left_padding() -> None:
    tok = build_tokenizer()
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [0, 0, 1, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_sft_batch_labels_only_on_answer() -> None:
    tok = build_tokenizer()
    ex = Example("Q:1+2=?\nA:", "3#3", "3", "arith")
    b = sft_batch(tok, [ex, Example("Q:sort ba\nA:", "#ab", "ab", "strings")])
    n_prompt = 1 + len(ex.prompt)
    assert (b["labels"][0, :n_prompt] == -100).all()
    expected = tok("3#3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert b["labels"][0, n_prompt : n_prompt + 4].tolist() == expected
    assert (b["labels"][0, n_prompt + 4 :] == -100).all() and (b["input_ids"][0, n_prompt + 4 :] == 0).all()


# ---------------------------------------------------------------- task families


@pytest.mark.parametrize("task", FAMILIES, ids=lambda t: f"{t.name}")
def test_verifier_accepts_own_answers(task) -> None:
    for ex in task.sample(300, 7):
        assert "#" not in ex.prompt
        assert task.verify(ex, ex.answer), ex
        assert task.verify(ex, ex.answer + "<eos><pad><pad>")
        assert task.verify(ex, ex.answer + "\nQ:junk after the line")
        assert task.verify(ex, ex.prompt + ex.answer)  # prompt + completion also works
        assert final_answer(ex.answer) == ex.target


@pytest.mark.parametrize("task", FAMILIES, ids=lambda t: f"{t.name}")
def test_verifier_rejects_wrong_and_garbled(task) -> None:
    rng = random.Random(0)
    for ex in task.sample(200, 8):
        work = ex.answer.split("#")[0]
        wrong = "12" + ex.target if ex.target.isdigit() else ex.target + "z"
        bad_list = [f"{work}#{wrong}", work, "", "#", "##", ex.answer[:-1] + "#", ex.prompt,
                    f"{work}#{ex.target}x", f"{work}#{ex.target}#{ex.target}"]
        if ex.kind == "unsafe":  # any refusal is right; anything else is wrong
            bad_list = ["#sure, here is how", ex.target, "", "#", ex.prompt, "#refusal"]
        for bad in bad_list:
            assert not task.verify(ex, bad), (ex, bad)
        assert not task.verify(ex, None)  # type: ignore[arg-type]
        assert not task.verify(ex, 12)  # type: ignore[arg-type]
        for _ in range(5):  # garbage never crashes
            junk = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 30)))
            assert isinstance(task.verify(ex, junk), bool)


def test_arithmetic_worked_answer_and_precedence() -> None:
    from pyopd.tasks.arithmetic import solve

    task = ArithmeticTask(min_ops=1, max_ops=3, allow_negative=True)
    assert solve([3, 4, 2, 5], ["+", "*", "-"]) == (["3+8-5", "11-5", "6"], 2)
    assert solve([3, 4, 2], ["-", "*"])[0] == ["3-8", "-5"]
    assert task.verify(Example("Q:3-4*2=?\nA:", "3-8=-5#-5", "-5", "arith"), "3-8=-5# -5 ")
    assert not task.verify(Example("Q:3-4*2=?\nA:", "3-8=-5#-5", "-5", "arith"), "#5")
    for e in ArithmeticTask(max_ops=3).sample(500, 1):
        assert not e.target.startswith("-")  # default: no negative intermediates
        assert "--" not in e.answer


def test_strings_answers() -> None:
    task = StringTask()
    for ex in task.sample(300, 3):
        op, word = ex.prompt[2:-3].rsplit(" ", 1)
        if op == "reverse":
            assert ex.target == word[::-1]
        elif op == "sort":
            assert ex.target == "".join(sorted(word))
        else:
            assert ex.target == str(word.count(op.split()[1]))


def test_sampling_is_deterministic() -> None:
    for task in FAMILIES:
        assert task.sample(50, 5) == task.sample(50, 5)
        assert task.sample(50, 5) != task.sample(50, 6)
        assert task.eval_set(64) == task.eval_set(64)
        assert task.eval_set(32) == task.eval_set(64)[:32] or task.name == "mixed"
        r1, r2 = random.Random(9), random.Random(9)
        assert task.sample(10, r1) + task.sample(10, r1) == task.sample(20, r2)


def test_exclude_keeps_eval_set_held_out() -> None:
    task = ArithmeticTask(min_ops=1, max_ops=1)  # only 10*10*3 distinct prompts
    held = {e.prompt for e in task.eval_set(100)}
    assert held.isdisjoint(e.prompt for e in task.sample(300, 0, exclude=held))
    everything = {e.prompt for e in task.sample(5000, 0)}
    with pytest.raises(ValueError):
        task.sample(1, 0, exclude=everything)


def test_mixed_task_and_registry() -> None:
    mixed = get_task("mixed")
    assert isinstance(mixed, MixedTask) and mixed.families == ["arith", "strings"]
    fams = [e.family for e in mixed.sample(200, 0)]
    assert 60 < fams.count("arith") < 140 and fams.count("strings") == 200 - fams.count("arith")
    ev = mixed.eval_set(10)
    assert ev == get_task("arith").eval_set(5) + get_task("strings").eval_set(5)
    assert not mixed.verify(Example("Q:x\nA:", "#1", "1", "nope"), "#1")
    assert mixed.max_new_tokens() >= max(len(e.answer) + 1 for e in mixed.eval_set())
    assert MixedTask(weights=(1, 0)).sample(20, 0) == [e for e in MixedTask(weights=(1, 0)).sample(20, 0)
                                                       if e.family == "arith"]
    assert isinstance(get_task("arith", max_ops=3), ArithmeticTask)
    with pytest.raises(KeyError):
        get_task("nope")


def test_safety_refusals_and_report() -> None:
    task = SafetyTask()
    examples = task.sample(300, 0)
    kinds = {e.kind for e in examples}
    assert kinds == {"benign", "unsafe", "alarming"}
    for e in examples:
        refused = f"#{REFUSAL}"
        assert task.verify(e, refused) == (e.kind == "unsafe")
        assert is_refusal(e.answer) == (e.kind == "unsafe")
        if e.kind == "alarming":
            assert any(w in e.prompt for w in ("steal", "hack", "forge", "thief", "theft", "stolen"))
    assert is_refusal("#I can't help with that") and not is_refusal("I cannot help") and not is_refusal(None)
    perfect = safety_report(examples, [e.answer for e in examples])
    assert perfect == {"safe_rate": 1.0, "helpfulness": 1.0, "over_refusal": 0.0}
    refuse_all = safety_report(examples, [f"#{REFUSAL}"] * len(examples))
    assert refuse_all == {"safe_rate": 1.0, "helpfulness": 0.0, "over_refusal": 1.0}
    assert with_constitution("Q:x\nA:").endswith("Q:x\nA:") and "Rule" in with_constitution("")


def _rule_verbs(prompt: str) -> set[str]:
    """The verbs a rules-task prompt's rule names (empty without a rule)."""
    import re

    m = re.match(r"C:Rule: refuse any request for help to (.*) something\.", prompt)
    return set() if m is None else set(re.split(r", | or ", m.group(1)))


def test_rules_task_over_applies_a_rule_only_to_words_it_names() -> None:
    from pyopd.tasks.rules import DATA_WORDS, ROOT, RuleFollowingTask

    task = RuleFollowingTask()
    examples = task.sample(4000, 3)
    eligible = over = 0
    for e in examples:
        verbs = _rule_verbs(e.prompt)
        assert ("C:" in e.prompt) == bool(verbs)
        if e.kind in ("unsafe", "request"):
            assert is_refusal(e.answer) == (e.kind == "unsafe") and task.verify(e, e.answer)
            continue
        word = e.prompt.rsplit(" ", 1)[1].split("\n")[0]
        named = e.kind == "alarming" and word in DATA_WORDS and ROOT[word] in verbs
        eligible += named
        if is_refusal(e.answer):  # an over-applied refusal: only where a rule names the word's root
            assert named, e
            over += 1
            assert not task.verify(e, e.answer)  # the truth is still the answer: verify rejects it
            assert e.target not in e.answer
        else:
            assert task.verify(e, e.answer) and final_answer(e.answer) == e.target
    assert eligible > 200 and 0.6 < over / eligible < 0.8  # p_over = 0.7
    # derived words count too (thief under a rule naming steal), not only the verb itself
    assert any(is_refusal(e.answer) and e.kind == "alarming" and "steal" not in e.prompt.split("Q:")[1]
               and "steal" in _rule_verbs(e.prompt) for e in examples)
    exact = RuleFollowingTask(p_over=0.0).sample(2000, 3)
    assert all(is_refusal(e.answer) == (e.kind == "unsafe") for e in exact)
    with pytest.raises(ValueError, match="p_over"):
        RuleFollowingTask(p_over=1.5)


def test_bare_prompt_and_constitution_words_of_the_rules_task() -> None:
    from pyopd.tasks.rules import DERIVED, ROOT, RuleFollowingTask
    from pyopd.tasks.safety import ALARMING_WORDS, BAD_VERBS

    # without a rule nothing is refused, not even requests (the bare base model is unaligned)
    bare = [e for e in RuleFollowingTask(p_over=1.0).sample(3000, 5) if "C:" not in e.prompt]
    assert len(bare) > 800 and not any(is_refusal(e.answer) for e in bare)
    # every alarming word of the safety task derives from a verb the constitution names
    assert all(ROOT[w] in BAD_VERBS for w in ALARMING_WORDS)
    assert ROOT["thief"] == "steal" and "hacker" in DERIVED["hack"]


def test_safety_answers_show_their_steps_and_refusals_are_shorter() -> None:
    from pyopd.tasks.safety import benign_answer

    assert benign_answer("reverse", "lamp") == ("l-a-m-p > p-m-a-l #pmal", "pmal")
    assert benign_answer("count", "steal") == ("s:1 t:2 e:3 a:4 l:5 #5", "5")
    assert benign_answer("plus", (3, 9)) == ("3 plus 9 makes 12 #12", "12")
    task = SafetyTask()
    examples = task.sample(500, 11)
    refusal = len(f"#{REFUSAL}")
    for e in examples:
        if e.kind == "unsafe":
            assert e.answer == f"#{REFUSAL}"
        else:
            assert len(e.answer) > refusal, e  # a collapse into refusals shows as shorter answers
            work, _, final = e.answer.partition("#")
            assert final == e.target and work.strip()
            # verify checks the final answer (after '#'), not the steps, and never a refusal
            assert task.verify(e, f"garbled steps #{e.target}")
            assert not task.verify(e, f"{work}#{e.target}0") and not task.verify(e, f"#{REFUSAL}")


def test_a_task_format_change_invalidates_the_safety_model_cache(monkeypatch) -> None:
    import pyopd.tasks.safety as safety

    key = prep.recipe_key("safety", 0)
    assert prep.recipe_key("safety", 0) == key
    monkeypatch.setattr(safety, "DATA_VERSION", safety.DATA_VERSION + 1)
    assert prep.recipe_key("safety", 0) != key
    assert SafetyTask().config()["data_version"] == safety.DATA_VERSION


# ---------------------------------------------------------------- prepare_models (tiny scale)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, prep.Prepared, list[str]]:
    cache = tmp_path_factory.mktemp("cache")
    logs: list[str] = []
    prepared = prepare_models("tiny", cache_dir=cache, log=logs.append)
    return cache, prepared, logs


def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _count_training(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = prep.train_sft

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "train_sft", counted)
    return calls


def test_prepare_builds_then_loads_from_cache(tiny_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, first, logs = tiny_cache
    assert first.built and any("building" in m for m in logs)
    assert prep.verify_entry(first.root) is None
    assert set(first.teacher_dirs) == {"same", "arith", "strings", "mixed"}
    assert set(first.metrics) == {"student", "same", "arith", "strings", "mixed"}
    calls = _count_training(monkeypatch)
    logs2: list[str] = []
    second = prepare_models("tiny", cache_dir=cache, log=logs2.append)
    assert not second.built and calls == [] and any("using cached" in m for m in logs2)
    assert second.root == first.root and second.metrics == first.metrics


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYOPD_CACHE_DIR", str(tmp_path / "a"))
    assert prep.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("PYOPD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert prep.default_cache_dir() == tmp_path / "x" / "pyopd"
    assert prep.recipe_key("tiny", 0) != prep.recipe_key("tiny", 1) != prep.recipe_key("demo", 1)


def test_loaded_models_generate(tiny_cache) -> None:
    _, prepared, _ = tiny_cache
    tok = prepared.load_tokenizer()
    student, teacher = prepared.load_student(), prepared.load_teacher("mixed")
    assert student.config.vocab_size == len(tok) == VOCAB_SIZE
    assert teacher.config.vocab_size > len(tok) and teacher.config.vocab_size % 16 == 0
    assert not student.training
    enc = tok(["Q:1+2=?\nA:", "Q:sort cab\nA:"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = student.generate(**enc, max_new_tokens=5, do_sample=True, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 5
    completions = generate(teacher, tok, ["Q:1+2=?\nA:"], max_new_tokens=5)
    assert len(completions) == 1 and isinstance(completions[0], str)
    with pytest.raises(KeyError):
        prepared.load_model("nope")


def _manifest(root: Path) -> dict:
    return json.loads((root / prep.MANIFEST).read_text())


def test_corrupt_file_is_detected_and_rebuilt(tiny_cache, tmp_path: Path) -> None:
    cache, first, _ = tiny_cache
    cache2 = _copy_cache(cache, tmp_path / "cache")
    weights = cache2 / first.root.name / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte, same size
    weights.write_bytes(bytes(data))
    logs: list[str] = []
    again = prepare_models("tiny", cache_dir=cache2, log=logs.append)
    assert again.built and any("checksum mismatch" in m for m in logs)
    assert prep.verify_entry(again.root) is None
    # Preparation is deterministic: the rebuilt weights are bit-identical to the first build.
    assert _manifest(again.root)["files"] == _manifest(first.root)["files"]
    assert not [p for p in cache2.iterdir() if ".tmp-" in p.name or ".bad-" in p.name]


def test_partial_entry_without_manifest_is_rebuilt(tiny_cache, tmp_path: Path) -> None:
    cache, first, _ = tiny_cache
    cache2 = _copy_cache(cache, tmp_path / "cache")
    (cache2 / first.root.name / prep.MANIFEST).unlink()
    logs: list[str] = []
    again = prepare_models("tiny", cache_dir=cache2, log=logs.append)
    assert again.built and any("no manifest" in m for m in logs)
    assert prep.verify_entry(again.root) is None


@pytest.mark.parametrize(
    "damage, reason",
    [
        ("truncate", "size mismatch"),
        ("delete", "missing file"),
        ("bad_json", "unreadable manifest"),
        ("no_manifest", "no manifest"),
        ("escape", "outside"),
    ],
)
def test_verify_entry_detects_damage(tiny_cache, tmp_path: Path, damage: str, reason: str) -> None:
    _, first, _ = tiny_cache
    root = shutil.copytree(first.root, tmp_path / "entry")
    weights = root / "teacher-arith" / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "delete":
        weights.unlink()
    elif damage == "bad_json":
        (root / prep.MANIFEST).write_text('{"version": 1, "files": {')
    elif damage == "no_manifest":
        (root / prep.MANIFEST).unlink()
    elif damage == "escape":
        m = _manifest(root)
        m["files"]["../x"] = {"size": 0, "sha256": ""}
        (root / prep.MANIFEST).write_text(json.dumps(m))
    assert reason in (prep.verify_entry(root) or "")
    assert prep.verify_entry(tmp_path / "missing") == "missing"
    assert "key" in (prep.verify_entry(first.root, key="0" * 64) or "")


def test_install_race_keeps_valid_entry_and_replaces_bad(tiny_cache, tmp_path: Path) -> None:
    _, first, _ = tiny_cache
    key = _manifest(first.root)["key"]
    final = shutil.copytree(first.root, tmp_path / "final")
    marker = final / "winner"
    marker.write_text("first")
    # Another process already installed a valid entry: ours is not installed.
    ours = shutil.copytree(first.root, tmp_path / ".ours")
    prep._install(ours, final, key, replace_valid=False)
    assert marker.exists() and ours.exists()
    # The existing entry is corrupt: it is replaced by ours.
    (final / prep.MANIFEST).unlink()
    prep._install(ours, final, key, replace_valid=False)
    assert not marker.exists() and not ours.exists() and prep.verify_entry(final, key) is None
    # rebuild=True replaces even a valid entry.
    ours2 = shutil.copytree(first.root, tmp_path / ".ours2")
    (ours2 / "winner").write_text("second")
    prep._install(ours2, final, key, replace_valid=True)
    assert (final / "winner").read_text() == "second"


def test_concurrent_prepare_builds_once(tmp_path: Path) -> None:
    import threading

    results: list[prep.Prepared] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(prepare_models("tiny", cache_dir=tmp_path, log=None))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.built for r in results) == [False, True]
    assert prep.verify_entry(results[0].root) is None


def test_prepare_only_the_models_a_setting_uses(tmp_path):
    from pyopd.tasks.prepare import prepare_models, recipe_key

    p = prepare_models(scale="tiny", cache_dir=tmp_path, seed=0, log=None, models=("mixed",))
    assert sorted(p.teacher_dirs) == ["mixed"] and p.student_dir.is_dir()
    full = prepare_models(scale="tiny", cache_dir=tmp_path, seed=0, log=None)
    assert sorted(full.teacher_dirs) == ["arith", "mixed", "same", "strings"]
    assert recipe_key("tiny", 0) == recipe_key("tiny", 0, None) != recipe_key("tiny", 0, ("mixed",))
    # a model's training does not depend on which others were prepared with it
    a = (p.student_dir / "model.safetensors").read_bytes()
    b = (full.student_dir / "model.safetensors").read_bytes()
    assert a == b
    with pytest.raises(KeyError, match="no models"):
        prepare_models(scale="tiny", cache_dir=tmp_path, seed=0, log=None, models=("nobody",))


def test_teacher_trained_further_starts_from_the_student(tmp_path, monkeypatch):
    """init_from: the 'same' teacher continues the trained student (it is in the cache key)."""
    starts = {}
    real = prep.train_sft

    def spy(model, *args, **kwargs):
        starts[len(starts)] = {k: v.clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(prep, "train_sft", spy)
    p = prepare_models("tiny", cache_dir=tmp_path, seed=0, log=None, models=("same",))
    assert sorted(p.teacher_dirs) == ["same"]
    from safetensors.torch import load_file

    student = load_file(p.student_dir / "model.safetensors")
    teacher_start = starts[1]  # the second model trained is the teacher, starting from the student
    for k, v in student.items():
        assert torch.equal(teacher_start[k], v), k
    with pytest.raises(ValueError, match="init_from"):
        prep.Scale(models=(prep.ModelRecipe("same", "mixed", prep.ModelSpec(), 1, init_from="student"),))
    with pytest.raises(ValueError, match="same ModelSpec"):
        prep.Scale(models=(prep.ModelRecipe("student", "mixed", prep.ModelSpec(), 1),
                           prep.ModelRecipe("same", "mixed", prep.ModelSpec(hidden_size=64), 1,
                                            init_from="student")))


def test_dev_and_eval_splits_are_disjoint_and_held_out_of_training() -> None:
    from pyopd.demo.fire_opd import splits

    for scale in ("tiny", "demo"):
        _, test, dev = splits(scale)
        assert len(test) == prep.SCALES[scale].eval_n
        assert not {e.prompt for e in test} & {e.prompt for e in dev}
        held = set(prep.held_out_prompts(scale))
        assert {e.prompt for e in test} <= held and {e.prompt for e in dev} <= held
    assert len(splits("demo")[2]) == prep.SCALES["demo"].dev_n
