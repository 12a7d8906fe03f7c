"""wsbcn_d2.engine.launch: workers leave their process group when their main function returns."""
import torch.distributed as dist

from wsbcn_d2 import engine


def test_worker_leaves_its_process_group_after_main(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    try:
        engine._run_then_leave_process_group(lambda *args: calls.append((args, dist.is_initialized())), 1, "a")
        assert calls == [((1, "a"), True)]  # main ran inside the group, with launch's arguments
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
