"""The tiny model and the model interface: save/reload routes, both logit families, mask id, padding."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel

from harness.model import load, mask_token_id, token_logits
from harness.rollout import encode_prompts
from tests.conftest import make_model


def test_reload_in_process_gives_identical_logits(model_dir, tokenizer):
    model, tok = load(model_dir)
    again = AutoModel.from_pretrained(model_dir)  # in-process registration route, no remote code
    ids, mask = encode_prompts(tok, ["12+34=", "3+4="])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, again(input_ids=ids, attention_mask=mask).logits)
    assert tok.mask_token_id == model.config.mask_token_id and tok.chat_template


def test_reload_through_auto_map_with_trust_remote_code(model_dir):
    """A fresh process that never imports harness loads the folder the way LLaDA and Dream are loaded."""
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModel, AutoTokenizer
        model = AutoModel.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor([tok.apply_chat_template([{{"role": "user", "content": "1+2="}}], add_generation_prompt=True, return_dict=False)])
        print(model(input_ids=ids).logits[0, -1, :3].tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    model, tok = load(model_dir)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, -1, :3]
    torch.testing.assert_close(torch.tensor(eval(out.stdout.strip().splitlines()[-1])), want, rtol=0, atol=1e-5)


def test_dream_style_shift_is_undone_by_token_logits(model, tokenizer):
    """A shifted (Dream-like) model with the same weights gives the same per-position logits after the shift."""
    dream = make_model(tokenizer, shift_logits=True)
    dream.load_state_dict(model.state_dict())
    ids, mask = encode_prompts(tokenizer, ["12+34=", "5+6="])
    with torch.no_grad():
        raw_llada, raw_dream = model(input_ids=ids).logits, dream(input_ids=ids).logits
        assert not torch.equal(raw_llada, raw_dream)
        a, b = token_logits(model, ids, mask, start=2), token_logits(dream, ids, mask, start=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a[..., model.config.mask_token_id] == -torch.inf).all()


def test_left_padding_does_not_change_a_row(model, tokenizer):
    ids, mask = encode_prompts(tokenizer, ["1+2=", "123+456=789"])
    alone, alone_mask = encode_prompts(tokenizer, ["1+2="])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits[0, -alone.shape[1]:]
        single = model(input_ids=alone, attention_mask=alone_mask).logits[0]
    torch.testing.assert_close(padded, single, rtol=0, atol=1e-5)


def test_mask_id_lookup_and_clear_error(tokenizer):
    class Cfg:
        model_type, mask_token_id = "llada", None

    class NoMask:
        mask_token_id = None

    assert mask_token_id(Cfg, NoMask) == 126336  # the family's known id
    Cfg.model_type = "mystery"
    with pytest.raises(ValueError, match="has no mask token: set `mask_token_id`"):
        mask_token_id(Cfg, NoMask, where="folder x")


def test_missing_model_folder_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m harness pretrain"):
        load(tmp_path / "nowhere")
