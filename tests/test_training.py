"""Training: configs, the smoke experiment, gradients, checkpoints, exact resume, export."""

from __future__ import annotations

import csv
import inspect
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate

from megacontext.cli import main as cli
from megacontext.gistnet import load_gistnet
from megacontext.substitution import score_window
from megacontext.training.train import check_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def smoke(tmp_path: Path, *overrides: str):
    return config("experiment=smoke", f"output_dir={tmp_path}", *overrides)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_trainer_configs_bind_to_lightning(trainer, tmp_path):
    cfg = config(f"trainer={trainer}", f"output_dir={tmp_path}")
    kwargs = {k: v for k, v in cfg.trainer.items() if k != "_target_"}
    inspect.signature(get_class(cfg.trainer._target_)).bind(**kwargs)  # every key is real
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)


@pytest.mark.parametrize("logger", group_options("logger"))
def test_logger_configs_instantiate(logger, tmp_path):
    cfg = config(f"logger={logger}", f"output_dir={tmp_path}")
    assert isinstance(instantiate(cfg.logger), L.pytorch.loggers.Logger)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_and_data_and_gistnet_nodes_instantiate(experiment, tmp_path):
    cfg = config(f"experiment={experiment}", f"output_dir={tmp_path}")
    check_config(cfg)
    dm = instantiate(cfg.data, model="tiny-random")
    assert dm.window.horizon == cfg.data.window.horizon
    assert instantiate(cfg.gistnet, hidden_size=64).width == cfg.gistnet.width
    for data in group_options("data"):
        extra = ["data.corpus=/nonexistent"] if data == "folder" else []
        node = config(f"data={data}", f"output_dir={tmp_path}", *extra).data
        assert get_class(node._target_) is type(dm)


@pytest.mark.parametrize("override, named", [
    ("gistnet.width=-3", "width=-3"),
    ("data.window.horizon=0", "horizon"),
    ("module.gist_rope=spiral", "gist_rope='spiral'"),
    ("module.optimizer.lr=-1", "lr=-1"),
    ("model.dtype=int8", "model.dtype='int8'"),
])
def test_bad_config_values_fail_before_training_naming_them(override, named, tmp_path):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace("[", r"\[")):
        train(smoke(tmp_path, override))


def read_losses(out: Path) -> dict[int, float]:
    rows = list(csv.DictReader(open(next(out.glob("csv/*/metrics.csv")))))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def test_smoke_trains_only_gistnet_and_exports_for_ingest(tmp_path):
    metrics, objects = train(smoke(tmp_path / "run"))
    module, base = objects["module"], objects["base"]
    for key in ("train/loss", "val/recovery_l1", "val/delta_nll_l1", "val/recovery_l2",
                "train/grad_norm", "train/tokens_per_s"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert any(k.startswith("train/delta_nll_l") for k in metrics)  # full context at step 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["train_loss"]) == 6 and len(history["val"]) == 2
    assert history["val"][-1]["val/recovery_l1"] == pytest.approx(metrics["val/recovery_l1"])
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 10_000
    # only GistNet is a parameter of the module, in the optimizer and in the checkpoint
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("gistnet.") for n in names)
    assert not any(p.requires_grad for p in base.parameters())
    optimizer = objects["trainer"].optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.gistnet.parameters()}
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all(k.startswith("gistnet.") for k in ckpt["state_dict"])
    # a gradient reaches GistNet and nothing else
    batch = next(iter(objects["datamodule"].train_dataloader()))
    module.zero_grad()
    score_window(base, batch["ids"], module.window_of(batch), "gist",
                 compressor=module.gistnet).backward()
    level = module.window_of(batch).level  # levels 1..level take part in a level-k window
    assert all(p.grad is not None for k in range(level)
               for p in module.gistnet.cores[k].parameters())
    assert all(p.grad is None for p in base.parameters())
    # the export loads and drives the ingest
    net = load_gistnet(objects["export_dir"], expect_fingerprint=base.fingerprint)
    torch.testing.assert_close(net.state_dict(), module.gistnet.state_dict())
    text = tmp_path / "doc.txt"
    text.write_text("memory " * 400)
    assert cli(["ingest", str(tmp_path / "tree"), str(text), "--model", "tiny-random",
                "--gistnet", str(objects["export_dir"]), "--quiet"]) == 0


def test_resume_continues_with_identical_losses(tmp_path):
    """6 steps straight vs 3 steps, stop, resume from last.ckpt for 3 more."""
    straight, _ = train(smoke(tmp_path / "a", "module.total_steps=6"))
    train(smoke(tmp_path / "b", "trainer.max_steps=3", "module.total_steps=6"))
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    train(smoke(tmp_path / "c", "module.total_steps=6", f"ckpt_path={ckpt}"))
    a, c = read_losses(tmp_path / "a"), read_losses(tmp_path / "c")
    # Lightning may label the resumed run's first logged step one higher (a validation ran at
    # the checkpoint's step), so compare the last three losses in order.
    straight_tail = [a[k] for k in sorted(a)][3:]
    resumed = [c[k] for k in sorted(c)]
    assert len(a) == 6 and len(resumed) == 3, (a, c)
    assert resumed == pytest.approx(straight_tail, abs=1e-6), (a, c)
