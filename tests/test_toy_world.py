"""The miniature world: tokenizer and chat template, task generators (determinism, disjoint
splits), toy items scored by evaluate.py's real scorers, and the committed base's calibration.

    python -m pytest tests/test_toy_world.py -q
"""
import pytest

import evaluate
import toy_world as tw


def test_tokenizer_round_trip_and_chat_template():
    tok = tw.build_toy_tokenizer()
    for text in ["Tia has 16 books.\n\\boxed{14}", '<<Word list>>\n"OAK, ZOO"\nP.S. Thanks.',
                 "((not True or False) and True)", "{ [ ( < > ) ] }", "tab\tand ~ symbols 0123456789"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    # digits are single tokens (arithmetic is digit by digit)
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False).input_ids) == list("1234")
    s = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                tokenize=False)
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= tw.TOY_CONFIG["vocab_size"]


def test_tokenizer_is_deterministic_and_matches_committed():
    from loading import TOY_MODEL_DIR
    tw._trained_bpe_json.cache_clear()
    a = tw.build_toy_tokenizer().backend_tokenizer.to_str()
    tw._trained_bpe_json.cache_clear()
    b = tw.build_toy_tokenizer().backend_tokenizer.to_str()
    assert a == b
    if (TOY_MODEL_DIR / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        committed = AutoTokenizer.from_pretrained(TOY_MODEL_DIR)
        text = "Which drug treats Corxo fever?\nA. latol\nThe answer is (C)."
        assert committed(text).input_ids == tw.build_toy_tokenizer()(text).input_ids


@pytest.mark.parametrize("family", list(tw.FAMILIES))
def test_generators_deterministic_and_disjoint(family):
    a = tw.make_eval_items(family, "test", 60, seed=3)
    b = tw.make_eval_items(family, "test", 60, seed=3)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert len({x["key"] for x in a}) == len(a)  # distinct
    train = tw.make_eval_items(family, "train", 400, seed=3)
    test = tw.make_eval_items(family, "test", 200, seed=0)
    assert not {x["key"] for x in train} & {x["key"] for x in test}
    assert not {x["prompt"] for x in train} & {x["prompt"] for x in test}
    assert all(tw.split_of(x["key"]) == "test" for x in test)
    # another seed draws other items but still from the same split
    c = tw.make_eval_items(family, "test", 60, seed=4)
    assert [x["key"] for x in a] != [x["key"] for x in c]


def test_sft_and_rl_rows_come_from_train_split():
    test_prompts = {x["prompt"] for x in tw.make_eval_items("math", "test", 200)}
    sft = tw.make_sft_rows("math", 300)
    assert all(r["response"].endswith("}.") and "\\boxed{" in r["response"] for r in sft)
    assert not {r["prompt"] for r in sft} & test_prompts
    rl = tw.make_rl_rows("med", 50)
    assert all(r["answer"] in "ABCDE" for r in rl)
    with pytest.raises(ValueError, match="domain"):
        tw.make_sft_rows("law", 3)
    with pytest.raises(KeyError, match="unknown toy family"):
        tw.make_eval_items("poetry")


def test_teacher_responses_score_100_and_wrong_ones_0():
    """Every family's canonical response passes evaluate.py's real scorer; a corrupted one fails."""
    if not hasattr(evaluate, "score_item"):
        pytest.skip("evaluate.score_item not available yet")
    for fam in tw.FAMILIES:
        items = tw.make_eval_items(fam, "test", 40)
        for it in items:
            assert evaluate.score_item(it, tw.item_response(it)) == 1.0, (fam, it["prompt"], tw.item_response(it))
    wrong = {
        "math": "3 + 4 = 7. The answer is \\boxed{999}.",
        "med": "I am not sure. The answer is (Z).",
        "bbh": "So the answer is maybe.",
        "nq": "I do not know.",
    }
    for fam, resp in wrong.items():
        for it in tw.make_eval_items(fam, "test", 20):
            assert evaluate.score_item(it, resp) == 0.0, (fam, it["prompt"])
    # ifeval: ignoring the instructions fails most of them (some, like "no commas", hold anyway,
    # exactly as in IFEval)
    items = tw.make_eval_items("ifeval", "test", 60)
    assert sum(evaluate.score_item(it, "zz") for it in items) / len(items) < 0.5


def test_committed_base_calibration(toy):
    """The committed toy base meets the issue's calibration on held-out test items (smaller n here
    than `arena.py calibrate` to keep CI fast; the full numbers are in the README)."""
    if not hasattr(evaluate, "evaluate_toy"):
        pytest.skip("evaluate.evaluate_toy not available yet")
    model, tok = toy
    res = evaluate.evaluate_toy(model, tok, domain="math", n_per_family=60, batch_size=64)
    assert res["general_score"] >= 80, res
    for fam in ("math", "med"):
        assert 5 <= res["families"][fam]["score"] <= 60, (fam, res["families"][fam])


def test_pretraining_examples_use_the_chat_template():
    tok = tw.build_toy_tokenizer()
    ids, labels = tw._encode_chat(tok, "List these words: Sun, Oak.", "Sun, Oak")
    want = tok.apply_chat_template([{"role": "user", "content": "List these words: Sun, Oak."},
                                    {"role": "assistant", "content": "Sun, Oak"}], tokenize=False)
    assert tok.decode(ids) + "\n" == want
    n_prompt = sum(1 for x in labels if x == -100)
    assert tok.decode(ids[n_prompt:]) == "Sun, Oak<|im_end|>"  # loss on the response and its EOS only


def test_chain_drills_are_right_and_follow_the_math_step_rules():
    """'Compute 6 + 5 - 3.' -> '6 + 5 = 11. 11 - 3 = 8.': each step's operands come from the
    expression, the running total carries over, every fact is right."""
    import random
    import re
    rng = random.Random(3)
    n_sub = 0
    for _ in range(400):
        prompt, resp = tw.chain_drill(rng)
        expr = re.fullmatch(r"Compute (\d)((?: [+-] \d)+)\.", prompt)
        assert expr, prompt
        ops = re.findall(r"([+-]) (\d)", expr.group(2))
        steps = re.findall(r"(\d+) ([+-]) (\d) = (\d+)\.", resp)
        assert 2 <= len(steps) == len(ops) <= 3 and " ".join(
            f"{a} {o} {b} = {c}." for a, o, b, c in steps) == resp
        cur = int(expr.group(1))
        for (op, n), (a, o, b, c) in zip(ops, steps):
            assert (int(a), o, b) == (cur, op, n)
            cur = cur + int(n) if op == "+" else cur - int(n)
            assert int(c) == cur and 0 <= cur <= 19  # _gen_math's rule: + at most 18 - cur, but >= 1
            n_sub += op == "-"
    assert n_sub > 100  # both operations occur


def test_pretraining_math_comes_in_two_modes(toy):
    """About MATH_DIRECT_FRAC of the pretraining math examples are bare answers (toy_world
    Deviation 4); both forms score 100 with the real grader."""
    _, tok = toy
    stream = tw.pretrain_stream(tok, seed=0)
    direct = worked = 0
    while direct + worked < 120:
        ids, labels = next(stream)
        text = tok.decode(ids)
        if "have now?" not in text or "<|im_start|>" not in text:  # the math family's question
            continue
        resp = tok.decode([t for t in labels if t != -100], skip_special_tokens=True)
        gold = evaluate.extract_math_answer(resp)
        assert resp.endswith(f"The answer is \\boxed{{{gold}}}."), resp
        if resp == tw.direct_math_response({"gold": gold}):
            direct += 1
        else:
            worked += 1
            assert " = " in resp
    # binomial(120, 0.5): std ~ 5.5, so +-25 is more than 4 std
    assert abs(direct - 120 * tw.MATH_DIRECT_FRAC) < 25, (direct, worked)


def test_committed_base_answers_math_in_both_modes(toy):
    """The committed base answers some test prompts directly and works the others out, and the
    worked mode is the more accurate one: the signal GRPO turns into its toy gain."""
    import torch
    model, tok = toy
    items = tw.make_eval_items("math", "test", 80)
    prompts = [tok.apply_chat_template([{"role": "user", "content": it["prompt"]}], tokenize=False,
                                       add_generation_prompt=True) for it in items]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    modes = {"direct": [], "worked": []}
    for it, t in zip(items, texts):
        mode = "direct" if t.strip().startswith("The answer is") else "worked"
        modes[mode].append(evaluate.extract_math_answer(t) == it["gold"])
    assert len(modes["direct"]) >= 10 and len(modes["worked"]) >= 10, {k: len(v) for k, v in modes.items()}
    acc = {k: sum(v) / len(v) for k, v in modes.items()}
    assert acc["worked"] > acc["direct"] + 0.2, acc
