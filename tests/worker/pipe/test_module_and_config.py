"""Partitioning, memory-efficient construction, config validation and error messages (one process)."""

from __future__ import annotations

import argparse

import conveyor
import pytest
import torch
from conveyor.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from conveyor.pipe.config import ConfigError, load_config
from conveyor.pipe.engine import DataExhaustedError
from conveyor.pipe.partition import PartitionError, partition
from conveyor.topology import Layout, Topology
from conveyor.utils import RepeatingLoader
from torch import nn

from tests.worker.pipe.models import HIDDEN, VOCAB, config, lm_loss, make_data, tied_layers


def test_parameters_method_balances_weights():
    assert partition("parameters", 2, [100, 10, 10, 10, 100], ["a"] * 5) == [0, 2, 5]
    assert partition("parameters", 3, [1, 1, 1, 1, 1, 1], ["a"] * 6) == [0, 2, 4, 6]


def test_uniform_type_and_explicit_methods():
    names = ["Embed", "Block", "Block", "Norm", "Block", "Block", "Head"]
    assert partition("uniform", 2, [0] * 7, names) == [0, 3, 7]
    # stage 1 starts at the third Block; non-matching layers stay with the stage before them
    assert partition("type:block", 2, [0] * 7, names) == [0, 4, 7]
    assert partition([0, 1, 7], 2, [0] * 7, names) == [0, 1, 7]


def test_empty_stage_is_a_clear_error():
    with pytest.raises(PartitionError, match="leaves stage 1 of 3 empty"):
        partition([0, 2, 2, 4], 3, [1] * 4, ["L"] * 4)
    with pytest.raises(PartitionError, match="3 layers cannot fill 4 stages"):
        partition("uniform", 4, [1] * 3, ["L"] * 3)
    with pytest.raises(PartitionError, match="matches 1 layers"):
        partition("type:Head", 2, [1] * 3, ["Block", "Block", "Head"])
    with pytest.raises(PartitionError, match="unknown partition_method 'size'"):
        partition("size", 2, [1] * 3, ["L"] * 3)
    with pytest.raises(PartitionError, match=r"partition_method='type:Block\(': .*regular expression"):
        partition("type:Block(", 2, [1] * 3, ["Block"] * 3)  # was re.error, naming neither key nor fix


class Counted(nn.Linear):
    built = 0

    def __init__(self, *args):
        super().__init__(*args)
        if self.weight.device.type != "meta":
            Counted.built += 1


@pytest.mark.parametrize("stage", [0, 1])
def test_a_stage_builds_only_its_own_layers(stage):
    Counted.built = 0
    layers = [LayerSpec(Counted, 4, 4) for _ in range(6)]
    net = PipelineModule(layers, topology=Topology(Layout(stages=2), rank=stage, world_size=2))
    assert Counted.built == 3 and (net.start, net.stop) == (3 * stage, 3 * stage + 3)
    assert sorted(net.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in range(net.start, net.stop) for p in ("weight", "bias")
    )


def test_seeded_layers_are_the_same_for_every_layout():
    whole = PipelineModule(tied_layers()).state_dict()
    for stage in range(3):
        part = PipelineModule(tied_layers(), topology=Topology(Layout(stages=3), rank=stage, world_size=3))
        for name, value in part.state_dict().items():
            assert torch.equal(value, whole[name]), name


def test_tied_layer_spec_shares_one_module_and_knows_its_stages():
    net = PipelineModule(tied_layers(), topology=Topology(Layout(stages=2), rank=1, world_size=2))
    assert net.tied_stages == {"embed": [0, 1]} and not net.tied_owner("embed")
    with pytest.raises(ValueError, match="without dots"):
        TiedLayerSpec("a.b", nn.Embedding, 2, 2)


def test_more_stages_than_processes_is_a_clear_error():
    with pytest.raises(Exception, match="num_stages=2 needs a process group"):
        PipelineModule(tied_layers(), num_stages=2)


def test_batch_sizes_resolve_like_deepspeed():
    assert load_config({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}).resolve_batch(2) == (
        32,
        4,
        4,
    )
    assert load_config({"train_batch_size": 16}).resolve_batch(2) == (16, 8, 1)
    assert load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}).resolve_batch(
        2
    ) == (12, 2, 3)
    cfg = {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}
    with pytest.raises(
        ConfigError, match=r"train_batch_size 30 != train_micro_batch_size_per_gpu 4 x .* = 32"
    ):
        load_config(cfg).resolve_batch(2)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"train_batch_size": 8, "optimzer": {}}, r"config.optimzer: unknown key"),
        ({"train_batch_size": 8, "pipeline": {"schedule": "zb"}}, r"config.pipeline.schedule"),
        ({"train_batch_size": 8, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, "enable at most one"),
        ({"train_batch_size": 8, "zero_optimization": {"stage": 2}}, "ZeRO stage 2 is not supported"),
        ({"gradient_clipping": 1.0}, "set train_batch_size or train_micro_batch_size_per_gpu"),
    ],
)
def test_bad_configs_name_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cfg).resolve_batch(1)


def test_unknown_optimizer_is_named():
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    with pytest.raises(ConfigError, match="optimizer.type 'Lion' is not supported"):
        conveyor.initialize(model=net, config={"train_batch_size": 2, "optimizer": {"type": "Lion"}})


@pytest.mark.parametrize(
    "params,message",
    [
        ({"lr": -1.0}, r"config.optimizer.params: Invalid learning rate: -1.0"),  # torch's ValueError
        ({"lr": "fast"}, r"config.optimizer.params: .*not supported between"),  # a string, as PyYAML gave
        ({"lr": 1e-3, "momentum_x": 1}, r"config.optimizer.params: .*momentum_x"),
        ({"lr": 1e-3, "betas": 0.9}, r"config.optimizer.params.betas 0.9: use a pair"),  # not a list
        (
            {"lr": 1e-3, "betas": [0.9, 0.99, 0.5]},
            r"config.optimizer.params.betas \[0.9, 0.99, 0.5\]: use a pair",
        ),
    ],
)
def test_a_bad_optimizer_argument_is_a_config_error_not_a_crash(params, message):
    # a ConfigError is a refusal (exit 2, no restart: failure.py); anything else a crash, restarted
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    with pytest.raises(ConfigError, match=message):
        conveyor.initialize(
            model=net, config={"train_batch_size": 2, "optimizer": {"type": "AdamW", "params": params}}
        )


@pytest.mark.parametrize(
    "scheduler,message",
    [
        ({"type": "WarmupLR", "params": {"warmup_num_steps": -5}}, r"params.warmup_num_steps -5: use a step"),
        (
            {"type": "WarmupLR", "params": {"warmup_max_lr": -0.1}},
            r"params.warmup_max_lr -0.1: use a learning",
        ),
        (
            {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_min_ratio": 1.5}},
            r"params.warmup_min_ratio 1.5: use a ratio in \[0, 1\]",
        ),
        (
            {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "cos_min_ratio": -0.1}},
            r"params.cos_min_ratio -0.1: use a ratio",
        ),
        ({"type": "WarmupDecayLR", "params": {"total_num_steps": "ten"}}, r"config.scheduler.params: "),
    ],
)
def test_a_schedule_argument_out_of_range_is_refused_not_clamped(scheduler, message):
    # a negative warm-up was taken as 2 steps, a ratio above 1 raised the rate: both trained on a
    # schedule nobody wrote
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    with pytest.raises(ConfigError, match=message):
        conveyor.initialize(
            model=net,
            config={
                "train_batch_size": 2,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                "scheduler": scheduler,
            },
        )


def test_iterator_running_dry_mid_batch_is_a_clear_error():
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(4, 1))
    with pytest.raises(
        DataExhaustedError, match="ran dry after 3 of 4 micro-batches of step 0.*RepeatingLoader"
    ):
        engine.train_batch(iter(make_data(1, 3)[0]))
    loader = RepeatingLoader(make_data(1, 3)[0])
    assert torch.isfinite(engine.train_batch(loader)) and loader.epoch == 1
    assert torch.isfinite(engine.eval_batch(loader))


def test_training_data_builds_a_repeating_loader():
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    data = [(ids[0], labels[0]) for ids, labels in make_data(1, 3)[0]]  # 3 samples, micro-batch 2
    engine, _, loader, _ = conveyor.initialize(model=net, config=config(2, 1), training_data=data)
    assert loader is not None
    for _ in range(3):  # crosses epoch boundaries
        assert torch.isfinite(engine.train_batch())
    assert engine.global_steps == 3 and engine.global_samples == 12


@pytest.mark.parametrize("stages", [1, 2])
def test_tied_specs_that_build_different_modules_are_refused(stages):
    # One process silently used the first spec's module for both; over 2 stages each stage built its own
    # and the tied broadcast of differently sized weights aborted the process in gloo.
    layers = tied_layers()
    layers[-1] = TiedLayerSpec("embed", nn.Embedding, VOCAB + 1, HIDDEN)
    topology = Topology(Layout(stages=stages), rank=0, world_size=stages)
    with pytest.raises(
        ValueError,
        match=r"TiedLayerSpec 'embed' at layer 5 builds Embedding \[weight \(17, 8\)\].* layer 0, builds .*\(16, 8\)",
    ):
        PipelineModule(layers, topology=topology)


def test_a_tied_weight_attr_the_module_lacks_is_refused():
    # unnoticed on one stage (nothing is tied there); an AttributeError only on the stages holding a copy
    layers = tied_layers()
    layers[0] = TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN, tied_weight_attr="wieght")
    with pytest.raises(
        ValueError,
        match=r"tied_weight_attr 'wieght' is not a parameter .*Embedding has parameters \['weight'\]",
    ):
        PipelineModule(layers)


@pytest.mark.parametrize(
    "optimizer,kind,decay",
    [
        ({"type": "AdamW", "params": {"lr": 1e-3}}, torch.optim.AdamW, 0.0),  # torch's default is 0.01
        ({"type": "AdamW", "params": {"lr": 1e-3, "adam_w_mode": True}}, torch.optim.AdamW, 0.0),
        ({"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}, torch.optim.AdamW, 0.1),
        ({"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1}}, torch.optim.AdamW, 0.1),
        (
            {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.1, "adam_w_mode": False}},
            torch.optim.Adam,
            0.1,
        ),
    ],
)
def test_adam_optimizers_take_deepspeeds_defaults(optimizer, kind, decay):
    # DeepSpeed's Adam and AdamW are its FusedAdam (weight_decay 0 unless given; AdamW always decoupled)
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    _, built, _, _ = conveyor.initialize(model=net, config={"train_batch_size": 2, "optimizer": optimizer})
    assert type(built) is kind and built.param_groups[0]["weight_decay"] == decay


@pytest.mark.parametrize("plain", [False, True])
def test_model_parameters_may_be_param_groups_as_in_deepspeed(plain):
    # DeepSpeed's model_parameters takes torch's param groups (weight decay off for biases and norms is the
    # usual use); they were read as parameters (AttributeError: 'dict' object has no attribute 'requires_grad')
    net = (
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        if plain
        else PipelineModule(tied_layers(), loss_fn=lm_loss)
    )
    net.requires_grad_(True)
    frozen = next(p for name, p in net.named_parameters() if name.endswith("bias"))
    frozen.requires_grad_(False)
    decayed = [p for name, p in net.named_parameters() if name.endswith("weight")]
    groups = [
        {"params": decayed, "weight_decay": 0.1},
        {"params": [p for name, p in net.named_parameters() if name.endswith("bias")], "weight_decay": 0.0},
    ]
    config = {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    _, optimizer, _, _ = conveyor.initialize(model=net, model_parameters=groups, config=config)
    # DeepSpeed's Adam decouples a group's weight decay as well as the config's
    assert type(optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert optimizer.param_groups[0]["params"] == decayed
    assert all(p is not frozen for g in optimizer.param_groups for p in g["params"])  # frozen left out


@pytest.mark.parametrize("plain", [False, True])
def test_optimizer_and_scheduler_may_be_callables_as_in_deepspeed(plain):
    # DeepSpeed builds them from callables (params -> optimizer, optimizer -> scheduler); they were kept as
    # the functions and the first step failed: 'function' object has no attribute 'step'
    net = nn.Sequential(nn.Linear(4, 1)) if plain else PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, optimizer, _, scheduler = conveyor.initialize(
        model=net,
        config={"train_batch_size": 2},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1),
    )
    assert isinstance(optimizer, torch.optim.SGD) and engine.optimizer is optimizer
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["params"] == list(net.parameters())


def test_a_config_given_twice_is_refused_and_deepscale_config_is_read(tmp_path):
    # DeepSpeed refuses a config in both args and initialize(config=); config= silently won here
    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}')
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    args = argparse.Namespace(deepspeed_config=str(path), deepscale_config=None)
    with pytest.raises(ConfigError, match=r"--deepspeed_config .*ds.json and config=: give one"):
        conveyor.initialize(args=args, model=net, config=config(2, 1))
    # the deprecated --deepscale_config, which add_config_arguments accepts, is read as DeepSpeed does
    args = argparse.Namespace(deepspeed_config=None, deepscale_config=str(path))
    engine, _, _, _ = conveyor.initialize(args=args, model=net)
    assert engine.train_batch_size() == 4


def test_training_data_without_a_whole_micro_batch_is_refused():
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    data = [(ids[0], labels[0]) for ids, labels in make_data(1, 1)[0]]  # 1 sample, micro-batch 2
    with pytest.raises(ValueError, match=r"training_data has 1 samples, fewer than one micro-batch"):
        conveyor.initialize(model=net, config=config(2, 1), training_data=data)


@pytest.mark.parametrize("plain", [False, True])
def test_a_step_clears_the_gradients_of_parameters_outside_the_optimizer(plain):
    # DeepSpeed's engine zeroes every module gradient after a step; only the optimizer's were, so a
    # parameter left out of model_parameters (frozen by exclusion) summed its gradient over all steps
    # and its growing norm entered the next steps' clipping
    if plain:
        net: nn.Module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
        subset = list(net[1].parameters())
    else:
        net = PipelineModule(tied_layers(), loss_fn=lm_loss)
        subset = [p for name, p in net.named_parameters() if name.startswith("layers.")]
    engine, _, _, _ = conveyor.initialize(model=net, model_parameters=subset, config=config(2, 1, clip=0.3))
    if plain:
        for _ in range(2):  # one accumulation boundary
            engine.backward(engine(torch.ones(2, 4)).pow(2).mean())
            engine.step()
    else:
        engine.train_batch(iter(make_data(1, 2)[0]))
    assert engine.global_steps == 1
    assert [name for name, p in net.named_parameters() if p.grad is not None] == []


def test_train_batch_under_no_grad_is_refused_before_the_schedule():
    # as DeepSpeed's: the last stage's backward failed mid-schedule, its neighbours left waiting on it
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1))
    data = iter(make_data(1, 2)[0])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"train_batch needs gradients.*eval_batch"):
        engine.train_batch(data)
    assert next(data) is not None and engine.global_steps == 0  # nothing was read or stepped


def test_the_plain_engine_loop_on_a_pipeline_names_train_batch():
    # a DeepSpeed tutorial loop ported onto a PipelineModule: 'object is not callable', 'has no attribute
    # backward'; DeepSpeed's PipelineEngine says to use train_batch
    net = PipelineModule(tied_layers(), loss_fn=lm_loss)
    engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1))
    ids = make_data(1, 1)[0][0][0]
    for call in (lambda: engine(ids), lambda: engine.backward(torch.zeros(())), engine.step, engine.forward):
        with pytest.raises(RuntimeError, match=r"trains with engine.train_batch\(data_iter\)"):
            call()


def test_eval_batch_without_data_iter_leaves_the_training_data_alone():
    # eval_batch() read its batch from the training_data loader: the next train_batch skipped it, and the
    # run's data order depended on how often it evaluated. DeepSpeed's eval_batch takes data_iter.
    data = [(ids[0], labels[0]) for ids, labels in make_data(1, 4)[0]]
    losses = []
    for evaluate in (False, True):
        net = PipelineModule(tied_layers(), loss_fn=lm_loss)
        engine, _, _, _ = conveyor.initialize(model=net, config=config(2, 1), training_data=data)
        if evaluate:
            with pytest.raises(DataExhaustedError, match=r"eval_batch needs data_iter .*train_batch's"):
                engine.eval_batch()
        losses.append([float(engine.train_batch()) for _ in range(2)])
    assert losses[1] == losses[0]
