"""tools/train_net.py with every process saving what the tests compare (a helper run as a script).

Each process writes ``OUTPUT_DIR/rank<R>.pth`` after training: ``{"state": its model's
state dict, "estimates": [its BCN estimates after each step], "losses": {name: [(value,
iteration), ...]}, "optimizer": the optimizer's state dict, "allreduce": (gradient all-reduce
passes, buckets all-reduced) under DDP}`` (losses are logged by rank 0 only, averaged over the
processes). DDP's all-reduce is counted by a comm hook that all-reduces as DDP does by default.
"""
import os
import sys

import torch
from detectron2.engine import HookBase
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from detectron2.utils import comm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
import train_net  # noqa: E402

ESTIMATES = ("batch_norm.running_mean", "batch_norm.running_var")


class DumpRankState(HookBase):
    def __init__(self):
        self._estimates = []

    def _state(self) -> dict:
        model = self.trainer.model
        return getattr(model, "module", model).state_dict()  # unwrapped from DDP

    def after_step(self):
        self._estimates.append({k: v.clone() for k, v in self._state().items() if k.endswith(ESTIMATES)})

    def after_train(self):
        histories = self.trainer.storage.histories()
        dump = {
            "state": self._state(),
            "estimates": self._estimates,
            "losses": {name: h.values() for name, h in histories.items() if "loss" in name},
            "optimizer": self.trainer.optimizer.state_dict(),
            "allreduce": (ALLREDUCE["passes"], ALLREDUCE["buckets"]),
        }
        torch.save(dump, os.path.join(self.trainer.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.pth"))


ALLREDUCE = {"passes": 0, "buckets": 0}


def counting_allreduce(state, bucket):
    ALLREDUCE["passes"] += bucket.index() == 0
    ALLREDUCE["buckets"] += 1
    return allreduce_hook(state, bucket)


class DumpingTrainer(train_net.Trainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        if isinstance(self.model, DistributedDataParallel):
            self.model.register_comm_hook(None, counting_allreduce)

    def build_hooks(self):
        return super().build_hooks() + [DumpRankState()]


# at import, not under __main__: the processes launch() spawns import this module, not run it
train_net.Trainer = DumpingTrainer

if __name__ == "__main__":
    train_net.invoke_main()
