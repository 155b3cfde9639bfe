"""The toy backbone as a real transformers LLaVA: loading paths, processor, projector swap."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fedsim.data.collate import encode_prompt, generation_batch, training_batch
from fedsim.models.backbone import (
    BackboneError,
    build_projector,
    check_projector_shapes,
    get_projector,
    init_projector,
    load_backbone,
    set_projector_,
)


def _images(n, size):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for _ in range(n)
    ]


def test_checkpoint_is_a_plain_hf_llava(toy_path):
    model = LlavaForConditionalGeneration.from_pretrained(toy_path)
    processor = AutoProcessor.from_pretrained(toy_path)
    assert model.config.vision_feature_select_strategy == "full"
    assert model.config.vision_feature_layer == -1
    assert hasattr(model.model.multi_modal_projector, "linear_1")
    assert (
        processor.tokenizer.convert_tokens_to_ids("<image>")
        == model.config.image_token_id
    )


def test_only_the_projector_trains(toy):
    trainable = {n for n, p in toy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".multi_modal_projector." in f".{n}" for n in trainable)


def test_collate_matches_llava_processor(toy, toy_path):
    """Our batches equal what LlavaProcessor produces (plus the BOS the word-level tokenizer omits)."""
    processor = AutoProcessor.from_pretrained(toy_path)
    size = toy.model.config.vision_config.image_size
    imgs = _images(2, size)
    prompt = toy.caption_prompt
    ref = processor(text=[prompt, prompt], images=imgs, return_tensors="pt")
    ours = generation_batch(toy, imgs, [prompt, prompt])
    bos = torch.full((2, 1), toy.tokenizer.bos_token_id)
    assert torch.equal(ours["input_ids"], torch.cat([bos, ref["input_ids"]], 1))
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    n_image = int((ours["input_ids"][0] == toy.image_token_id).sum())
    assert (
        n_image
        == toy.image_seq_length
        == (size // toy.model.config.vision_config.patch_size) ** 2 + 1
    )


def test_training_labels_cover_the_target_only(toy):
    imgs = _images(2, toy.model.config.vision_config.image_size)
    b = training_batch(
        toy,
        imgs,
        [toy.caption_prompt, toy.qa_prompt.format(question="is there a red circle ?")],
        ["a small red circle at the top left", "yes"],
    )
    for i, target in enumerate(["a small red circle at the top left", "yes"]):
        labelled = b["labels"][i][b["labels"][i] != -100].tolist()
        expected = toy.tokenizer.convert_tokens_to_ids(target.split()) + [
            toy.tokenizer.eos_token_id
        ]
        assert labelled == expected
        n_prompt = len(
            encode_prompt(
                toy,
                toy.caption_prompt
                if i == 0
                else toy.qa_prompt.format(question="is there a red circle ?"),
            )
        )
        assert (b["labels"][i][:n_prompt] == -100).all()
    # Right padding: the shorter row (the caption) ends in masked pad ids.
    lengths = b["attention_mask"].sum(1)
    short = int(lengths.argmin())
    assert lengths[short] < b["input_ids"].shape[1]
    assert (b["input_ids"][short, lengths[short] :] == toy.tokenizer.pad_token_id).all()
    assert (b["attention_mask"][short, lengths[short] :] == 0).all()


def test_vision_lm_pair_loads_to_the_same_model(toy, toy_path):
    pair = load_backbone(toy_path / "vision", lm=toy_path / "lm")
    w = init_projector(toy, 3)
    set_projector_(toy, w)
    set_projector_(pair, w)
    imgs = _images(2, toy.model.config.vision_config.image_size)
    batch = generation_batch(toy, imgs, [toy.caption_prompt] * 2)
    with torch.no_grad():
        a = toy.model(**batch).logits
        b = pair.model(**batch).logits
    # assert_close's float32 default (rtol 1.3e-6, atol 1e-5): the same weights, inputs and
    # kernels in one process; only module wiring differs, so equal up to a few roundings.
    torch.testing.assert_close(a, b)


def test_projector_swap_is_in_place(toy):
    params = dict(toy.projector.named_parameters())
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    w = init_projector(toy, 11)
    set_projector_(toy, w)
    assert {k: p.data_ptr() for k, p in toy.projector.named_parameters()} == ptrs
    got = get_projector(toy)
    assert all(torch.equal(got[k], w[k]) for k in w)


def test_init_projector_is_seeded_and_bounded(toy):
    a, b, c = init_projector(toy, 1), init_projector(toy, 1), init_projector(toy, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["linear_1.weight"], c["linear_1.weight"])
    fan_in = a["linear_1.weight"].shape[1]
    assert a["linear_1.weight"].abs().max() <= 1 / fan_in**0.5


def test_projector_shape_mismatch_is_a_clear_error(toy):
    w = init_projector(toy, 0)
    w["linear_1.weight"] = torch.zeros(3, 3)
    with pytest.raises(BackboneError, match=r"linear_1.weight has shape \[3, 3\]"):
        check_projector_shapes(toy, w, "projector")
    del w["linear_2.bias"]
    with pytest.raises(BackboneError, match="missing"):
        set_projector_(toy, w)


@pytest.mark.parametrize(
    "kind, layers", [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)]
)
def test_projector_factory(kind, layers):
    proj = build_projector(kind, 8, 16)
    linears = [m for m in proj.modules() if isinstance(m, torch.nn.Linear)]
    assert (
        len(linears) == layers
        and linears[0].in_features == 8
        and linears[-1].out_features == 16
    )
    with pytest.raises(BackboneError, match="unknown projector"):
        build_projector("mlp_relu", 8, 16)


def test_missing_backbone_path(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="config.json"):
        load_backbone(tmp_path / "empty")
