"""Reading the fused MoE parameters of transformers 5.x from checkpoints that store one tensor per expert
(what ``save_pretrained`` writes by default) or the fused tensor itself, in one process: every rank's
slice equals the same slice of the live model's parameter, and only that slice's bytes are read."""

from __future__ import annotations

from pathlib import Path

import conveyor
import pytest
import torch
from conveyor.autotp import AutoTPError
from conveyor.autotp.sources import Joined, SafetensorsFiles, converted_sources
from safetensors.torch import load_file, save_file

from tests.worker.autotp.families import build


def _experts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("original_format", [True, False])
def test_each_ranks_slice_of_a_fused_expert_weight(
    family: str, original_format: bool, tmp_path: Path
) -> None:
    model, _ = build(family)
    model.save_pretrained(tmp_path, save_original_format=original_format)
    files = SafetensorsFiles(sorted(tmp_path.glob("*.safetensors")))
    try:
        stored_fused = any(k.endswith("experts.gate_up_proj") for k in files.names())
        assert stored_fused is not original_format  # the layout under test is the one on disk
        assembled, unreadable = converted_sources(model, files)
        assert unreadable == {}
        experts = _experts(model)
        assert len(experts) == 4  # gate_up_proj and down_proj of 2 layers
        for name, full in experts.items():
            src = assembled[name] if original_format else files.stored(name)
            assert isinstance(src, Joined) is original_format
            assert src.shape == tuple(full.shape)
            whole = files.read(src)
            assert torch.equal(whole, full), name
            inner = full.shape[1] // 2 if name.endswith("gate_up_proj") else full.shape[2]
            dim = 1 if name.endswith("gate_up_proj") else 2
            for tp in (2, 4):
                for rank in range(tp):
                    size = inner // tp
                    # gate_up keeps piece r of the gate and piece r of the up half; down piece r of its inputs
                    pieces = [torch.arange(rank * size, (rank + 1) * size)]
                    if dim == 1:
                        pieces.append(pieces[0] + inner)
                    index = torch.cat(pieces)
                    before = files.read_bytes
                    part = files.read(src, dim, index)
                    assert torch.equal(part, full.index_select(dim, index)), (name, tp, rank)
                    assert files.read_bytes - before == part.numel() * part.element_size()
                    if original_format:  # at most one expert's run of one projection beside the result
                        assert 0 < files.beside <= part.numel() * part.element_size() // full.shape[0]
    finally:
        files.close()


def test_a_checkpoint_missing_an_expert_is_refused_naming_the_assembly(tmp_path: Path) -> None:
    model, _ = build("mixtral")
    model.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(AutoTPError, match=r"experts.gate_up_proj \(assembled from .*\) has shape"):
        conveyor.init_inference(meta, tensor_parallel=1, checkpoint=tmp_path)


def test_a_conversion_this_reader_does_not_know_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If transformers assembled the experts with an operation we do not read (here a transpose after the
    stack), the parameter is reported missing with that reason instead of being read wrong."""
    import transformers.conversion_mapping as mapping
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

    model, _ = build("qwen2_moe")
    model.save_pretrained(tmp_path)
    real = mapping.get_model_conversion_mapping(model)

    def odd(_model: object) -> list:
        down = WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeModulelist(dim=0), Transpose(1, 2)],
        )
        return [real[0], down]

    monkeypatch.setattr(mapping, "get_model_conversion_mapping", odd)
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(AutoTPError, match=r"experts.down_proj: transformers assembles it with .*Transpose"):
        conveyor.init_inference(meta, tensor_parallel=1, checkpoint=tmp_path)
