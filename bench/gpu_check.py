"""The first-GPU validation run, prepared: build, CUDA tests and a benchmark subset with side-by-side ratios.

    python -m bench.gpu_check --out DIR [--build] [--dry-run]

from the repository root. Stages, each stopped at its time budget (seconds, BUDGETS; < 8 minutes in all):
build (--build: `BUILD_COMMAND`, sm_90 only; otherwise printed), the CUDA tests (`pytest -m cuda`),
meta_sim (and its kernel variants), attention, hinge loss (and the largest batch within 4 GiB), search
(streamed top-k vs the full matrix), one AVSE and one MH-CVSE training step. Everything is timed in this one
process, so the ratios compare like with like. After every stage DIR/gpu_check.json and DIR/gpu_check.md
are rewritten, so a run stopped anywhere still leaves what it measured. A failing case is recorded (its
error) and the run goes on.

--dry-run runs the same code at tiny sizes (on CPU here; in CI through tests/test_gpu_check.py), so that
the script cannot crash the first time it meets a GPU. Timings of a dry run mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD_COMMAND = "MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 VSE_KERNELS_CUDA=1 pip install --no-build-isolation --no-deps ."
BUDGETS = {"build": 145, "tests": 85, "meta_sim": 100, "attention": 45, "hinge_loss": 30, "search": 15,
           "models": 35}  # 455 s
GRACE = 3   # seconds a stage may run past its budget before the alarm stops it (cases check the budget first)


class StageTimeout(BaseException):
    """Raised by the alarm a little after a stage's budget: a case that overruns (a long torch.compile, a
    hung test run) is cut off. A BaseException, so that the per-case handlers let it through."""


def _alarm(signum, frame):
    raise StageTimeout


class Run:
    """Rows of measurements, the stages' outcomes, and their files in DIR (rewritten after every stage)."""

    def __init__(self, out: Path, dry: bool):
        import torch
        self.out, self.dry, self.rows, self.stages = out, dry, [], {}
        self.gpu = torch.cuda.is_available()
        self.device = "cuda" if self.gpu else "cpu"
        self.deadline = 0.0
        self.info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         dry_run=dry, python=platform.python_version(), torch=torch.__version__,
                         device=torch.cuda.get_device_name(0) if self.gpu else "cpu")
        try:
            import triton
            self.info["triton"] = triton.__version__
        except ImportError:
            pass

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn) -> None:
        start = time.monotonic()
        self.deadline = start + BUDGETS[name]
        print(f"== {name} (budget {BUDGETS[name]} s)", flush=True)
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, BUDGETS[name] + GRACE)
        try:
            status = fn(self) or "done"
        except StageTimeout:
            status = f"stopped {GRACE} s past its budget"
        except Exception as error:   # a broken stage is a finding: record it, go on with the next
            status = f"failed: {type(error).__name__}: {error}"
            (self.out / f"{name}.error.txt").write_text(traceback.format_exc())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.stages[name] = dict(status=status, seconds=round(time.monotonic() - start, 1))
        print(f"   {name}: {status} ({self.stages[name]['seconds']} s)", flush=True)
        self.save()

    def measure(self, stage: str, case: str, impl: str, fn, *, iters: int, work: float | None = None,
                unit: str = "", ours: str = "vse_kernels") -> dict | None:
        """Times fn (median of up to `iters` synchronised calls after one warm-up, within the budget; a dry
        run calls it once) and records it with `work / time` (TFLOP/s, GB/s or samples/s) and the ratio of
        its time to `ours` in this case."""
        import torch
        row = dict(stage=stage, case=case, impl=impl)
        if self.left() <= 0:
            row["error"] = "stage budget spent"
        else:
            try:
                row["ms"] = 1e3 * _median_seconds(fn, iters, self.deadline, self.gpu, warmup=not self.dry)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
                if self.gpu:
                    torch.cuda.empty_cache()
        if "ms" in row:
            if work is not None:
                row[unit] = work / (row["ms"] / 1e3)
            base = next((r for r in self.rows if r["case"] == case and r["impl"] == ours and "ms" in r), None)
            if base is not None and impl != ours:
                row["time_vs_ours"] = row["ms"] / base["ms"]   # > 1: ours is faster
        self.rows.append(row)
        print("   ", _cells(row), flush=True)
        return row

    def save(self) -> None:
        data = dict(info=self.info, stages=self.stages, rows=self.rows)
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1))
        lines = [f"# gpu_check {'(dry run) ' if self.dry else ''}{self.info['date']}", "",
                 ", ".join(f"{k}: {v}" for k, v in self.info.items() if k != "date"), "",
                 "| stage | status | s |", "| --- | --- | --- |"]
        lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in self.stages.items()]
        for stage in dict.fromkeys(r["stage"] for r in self.rows):
            lines += ["", f"## {stage}", "", "| case | impl | ms | rate | time / ours |", "| --- | --- | --- | --- | --- |"]
            lines += ["| " + " | ".join(_cells(r)) + " |" for r in self.rows if r["stage"] == stage]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _cells(row: dict) -> list[str]:
    rate = next((f"{row[k]:.1f} {k}" for k in ("TFLOPs", "GBps", "samples_per_s", "queries_per_s") if k in row), "")
    if "peak_gib" in row:
        rate += f", peak {row['peak_gib']:.2f} GiB"
    if "largest_batch" in row:
        rate = f"B = {row['largest_batch']}"
    ms = f"{row['ms']:.3f}" if "ms" in row else row.get("error", "")
    ratio = f"{row['time_vs_ours']:.2f}x" if "time_vs_ours" in row else ""
    return [row["case"], row["impl"], ms, rate, ratio]


def _median_seconds(fn, iters: int, deadline: float, gpu: bool, warmup: bool = True) -> float:
    import torch
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if warmup:   # compiles, autotunes
        fn()
        sync()
    times = []
    while len(times) < iters and (not times or time.monotonic() < deadline):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- stages

def build(run: Run, requested: bool):
    if not requested or run.dry:
        print(f"   not built; on a fresh GPU machine run (or pass --build): {BUILD_COMMAND}")
        return "skipped (no --build)" if not run.dry else "skipped (dry run)"
    env = dict(os.environ, MAX_JOBS="16", TORCH_CUDA_ARCH_LIST="9.0", VSE_KERNELS_CUDA="1")
    with open(run.out / "build.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=max(1, run.left()))
    return "done" if result.returncode == 0 else f"failed (rc {result.returncode}, see build.log)"


def cuda_tests(run: Run):
    # A dry run only collects them (they skip without a GPU anyway): it checks the command, not the GPU.
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/"]
    if run.dry:
        command += ["--collect-only", "tests/test_hinge_loss.py"]
        command.remove("tests/")
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(1, run.left()))
    except subprocess.TimeoutExpired as expired:
        (run.out / "tests.log").write_text((expired.stdout or b"").decode(errors="replace") if isinstance(
            expired.stdout, bytes) else (expired.stdout or ""))
        return "stopped at the budget (see tests.log)"
    (run.out / "tests.log").write_text(result.stdout + result.stderr)
    summary = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return f"{'passed' if result.returncode == 0 else f'rc {result.returncode}'}: {summary}"


def _in_variant(variant, step):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    def run_in_variant():
        with tk.use_variant(variant):
            return step()
    return run_in_variant


def meta_sim(run: Run):
    import torch
    import bench_meta_sim as bm
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    variants = {"split_units": tk.Variant(split_units=True), "problem_tiles": tk.Variant(problem_tiles=True),
                "backward_splits=auto": tk.Variant(backward_splits=0),
                "all": tk.Variant(split_units=True, problem_tiles=True, backward_splits=0)}

    sizes = ([((8, 8), "fwd+bwd"), ((16, 16), "fwd+bwd"), ((8, 40), "eval"), ((16, 80), "eval")] if run.dry else
             [((128, 128), "fwd+bwd"), ((512, 512), "fwd+bwd"), ((1000, 5000), "eval"), ((5000, 25000), "eval")])
    cases = [(setting, size, mode) for setting in bm.SETTINGS for size, mode in sizes]
    iters = lambda ni, nt: 1 if run.dry else 10 if ni * nt <= 512 * 512 else 3
    for setting, (ni, nt), mode in cases:
        m, q, d = bm.SETTINGS[setting]
        flops = 2 * ni * nt * m * q * d * (3 if mode == "fwd+bwd" else 1)
        case = f"{setting} {ni}x{nt} {mode}"
        for impl in ("vse_kernels", "reference"):
            run.measure("meta_sim", case, impl, bm._step(bm.IMPLS[impl], (ni, nt), setting, mode),
                        iters=iters(ni, nt), work=flops / 1e12, unit="TFLOPs")
        # The kernel variants (issue 16): time / ours > 1 means the default is faster. Each where it applies:
        # the backward splits with a backward, problem-sized tiles below the autotuned size (4 GFLOP).
        for name, variant in variants.items():
            if (variant.backward_splits != 1 and mode != "fwd+bwd"
                    or variant == tk.Variant(problem_tiles=True) and 2 * ni * nt * m * q * d >= 2**32):
                continue
            run.measure("meta_sim", case, f"vse_kernels [{name}]", _in_variant(
                variant, bm._step(bm.IMPLS["vse_kernels"], (ni, nt), setting, mode)), iters=iters(ni, nt),
                work=flops / 1e12, unit="TFLOPs")
        # The tensor-core yardstick: a square bf16 matmul of the same FLOPs.
        n = max(16, round((flops / 2) ** (1 / 3) / 16) * 16)
        a, b = (torch.randn(n, n, device=run.device, dtype=torch.bfloat16) for _ in range(2))
        run.measure("meta_sim", case, f"bf16 matmul {n}^3", lambda a=a, b=b: a @ b, iters=iters(ni, nt),
                    work=2 * n**3 / 1e12, unit="TFLOPs")
    # torch.compile last, with what the budget leaves: inductor compiles each shape for seconds (on CPU
    # it compiles C++ for a minute, so the dry run leaves it out).
    for setting, (ni, nt), mode in [] if run.dry else cases:
        m, q, d = bm.SETTINGS[setting]
        flops = 2 * ni * nt * m * q * d * (3 if mode == "fwd+bwd" else 1)
        run.measure("meta_sim", f"{setting} {ni}x{nt} {mode}", "reference_compiled",
                    bm._step(bm.IMPLS["reference_compiled"], (ni, nt), setting, mode), iters=iters(ni, nt),
                    work=flops / 1e12, unit="TFLOPs")


def attention(run: Run):
    import torch
    from torch.nn.attention import SDPBackend
    import bench_attention as ba

    batch, iters = (1, 1) if run.dry else (1024, 20)   # B·H = 8192 at H = 8 (SPEC §2.3: judged in GB/s)
    ops = {"vse_kernels": ba.OPS["vse_kernels"], "sdpa_default": ba.OPS["sdpa_default"]}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            ops[f"sdpa_{name.lower().removesuffix('_attention')}"] = ba._sdpa(getattr(SDPBackend, name))
    for mode in ba.MODES:
        backward = mode == "fwd+bwd"
        for masked in (False, True):
            case = f"L=36 B·H={batch * ba.HEADS} Dh={ba.HEAD_DIM} {mode}{' mask' if masked else ''}"
            inputs = ba._inputs(batch, 36, masked, backward)
            moved = batch * ba.HEADS * 36 * ba.HEAD_DIM * ba.DTYPE.itemsize * (12 if backward else 4)
            for impl, fn in ops.items():
                if impl == "sdpa_flash" and masked:
                    continue   # takes no mask
                run.measure("attention", case, impl, ba._step(fn, inputs, backward), iters=iters, work=moved / 1e9,
                            unit="GBps")
            del inputs
            steps = ba._modules(batch, 36, masked, backward)
            for impl, fn in steps.items():   # the module at E = 1024, vs nn.MultiheadAttention
                run.measure("attention", "module " + case, impl, fn, iters=iters)
            del steps
            if run.gpu:
                torch.cuda.empty_cache()


def hinge_loss(run: Run):
    import torch
    import bench_hinge_loss as bh

    impls = dict(bh.IMPLEMENTATIONS)
    if run.dry:
        impls.pop("compiled_reference")
    for batch in [8, 16] if run.dry else [1024, 2048, 4096, 8192]:
        scores = torch.randn(batch, batch, device=run.device, requires_grad=True)
        img_ids = torch.arange(batch, device=run.device) // 5
        for impl, loss_fn in impls.items():
            def step(loss_fn=loss_fn):
                return torch.autograd.grad(loss_fn(scores, max_violation=True, img_ids=img_ids), scores)[0]
            run.measure("hinge_loss", f"B={batch} hardest fwd+bwd", impl, step, iters=1 if run.dry else 20,
                        work=batch * batch * 8 / 1e9, unit="GBps")
    largest_batch_within(run, limit_gib=4.0)


def largest_batch_within(run: Run, limit_gib: float):
    """The largest batch (doubling) whose fwd+bwd from embeddings (D = 1024, bf16, inputs and gradients
    included) peaks within limit_gib: the tiled loss against scoring with a matmul and the hinge kernel."""
    import torch
    import bench_hinge_loss_embeddings as be

    for impl in ("tiled", "materialised_kernel"):
        fits = None
        for batch in [8, 16] if run.dry else [2**k for k in range(12, 21)]:
            def step(batch=batch, loss_fn=be.IMPLEMENTATIONS[impl]):
                img = torch.randn(batch, be.DIM, device=run.device, dtype=be.DTYPE, requires_grad=True)
                txt = torch.randn(batch, be.DIM, device=run.device, dtype=be.DTYPE, requires_grad=True)
                loss = loss_fn(img, txt, img_ids=torch.arange(batch, device=run.device) // 5)
                return torch.autograd.grad(loss, (img, txt))
            if run.gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            row = run.measure("hinge_loss", f"from embeddings B={batch} D={be.DIM} fwd+bwd", impl, step, iters=1)
            if "ms" not in row:   # out of memory, or the budget is spent
                break
            if run.gpu:
                row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                if row["peak_gib"] > limit_gib:
                    break
            fits = batch
        run.rows.append(dict(stage="hinge_loss", case=f"largest B within {limit_gib:g} GiB", impl=impl,
                             largest_batch=fits))


def search(run: Run):
    """Text-to-image search with AVSE's score: the streamed top-k of vse_models.topk (chunks of the gallery
    scored by meta_sim, a running top-k kept on the device) against scoring the whole gallery at once and
    torch.topk (holds the Nq x Ng matrix)."""
    import torch
    import torch.nn.functional as F
    import vse_kernels as vk
    from vse_models.topk import search as streamed_search

    n, queries, k = (64, 8, 5) if run.dry else (200_000, 1000, 10)   # grid setting: 8 units of 256 per image
    gallery = F.normalize(torch.randn(n, 8, 256, device=run.device), dim=-1)
    texts = F.normalize(torch.randn(queries, 4, 256, device=run.device), dim=-1)
    case = f"{queries} texts x {n} images, k={k}"
    run.measure("search", case, "streamed top-k", lambda: streamed_search(texts, gallery, k, score=vk.meta_sim),
                iters=1 if run.dry else 3, work=queries, unit="queries_per_s", ours="streamed top-k")
    run.measure("search", case, "full matrix + torch.topk", lambda: vk.meta_sim(gallery, texts).t().topk(k, dim=1),
                iters=1 if run.dry else 3, work=queries, unit="queries_per_s", ours="streamed top-k")


def models(run: Run):
    import bench_avse
    import bench_mhcvse

    iters = 1 if run.dry else 5
    if run.dry:   # the bench modules' CPU sizes still take seconds a step
        bench_avse.BATCH, bench_mhcvse.SIZES = 4, {**bench_mhcvse.SIZES, "batch": 4}
    for precision in ["fp32"] if run.dry else ["bf16", "fp32"]:
        for backend in ("kernels", "reference"):
            run.measure("models", f"AVSE regions train step {precision}", backend,
                        bench_avse._train_step("regions", backend, precision), iters=iters,
                        work=bench_avse.BATCH, unit="samples_per_s", ours="kernels")
        for backend in ("kernels", "reference"):
            run.measure("models", f"MH-CVSE train step {precision}", backend, bench_mhcvse._step_fn(backend, precision),
                        iters=iters, work=bench_mhcvse.SIZES["batch"], unit="samples_per_s", ours="kernels")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / .md and logs")
    parser.add_argument("--build", action="store_true", help=f"first run: {BUILD_COMMAND}")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, to check the script itself")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH))   # the bench modules import their helpers as `common`
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")   # as bench/conftest.py: imports work, nothing is timed
    # The build must come before anything imports vse_kernels, so that this process loads the new build.
    run = Run(args.out, args.dry_run)
    run.stage("build", lambda r: build(r, args.build))
    for name, fn in [("tests", cuda_tests), ("meta_sim", meta_sim), ("attention", attention),
                     ("hinge_loss", hinge_loss), ("search", search), ("models", models)]:
        run.stage(name, fn)
    print(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")
    return 0 if all(s["status"].startswith(("done", "skipped", "passed")) for s in run.stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
