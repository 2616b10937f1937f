"""Running one benchmark/ablation row (build the config with the run-wide settings, train or load,
evaluate, measure) and the run-wide progress bar: the engine behind ``tools/benchmark.py`` and
``tools/ablate.py``. Measuring is in ``bench_measure``, the table in ``bench_report``.

Training seconds per iteration are the median of Detectron2's per-iteration ``time`` (data
loading included, first 3 iterations excluded).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from detectron2.engine import HookBase

if __package__:  # imported as ``tools.<name>`` (the tests, another tool)
    from .bench_measure import (
        count_gflops,
        count_parameters,
        extract_metrics,
        measure_latency,
        peak_memory_mb,
        task_of,
    )
    from .bench_report import COLUMNS, VIDEO_COLUMNS, fmt
else:  # run as a script: tools/ is sys.path[0] (Detectron2 installs a package `tools`)
    from bench_measure import (
        count_gflops,
        count_parameters,
        extract_metrics,
        measure_latency,
        peak_memory_mb,
        task_of,
    )
    from bench_report import COLUMNS, VIDEO_COLUMNS, fmt

logger = logging.getLogger("queryseg.benchmark")

#: the Visualizer grid: images per row and the least side of a panel in pixels
GRID_IMAGES, GRID_PANEL = 4, 256
#: instances (and panoptic things) below this score are not drawn in the grid: query-based
#: models score their detections lower than R-CNN heads (at 0.5 a QueryInst row at AP 41 shows
#: none)
GRID_SCORE = 0.3
# Relative cost of one step of each stage, in "batch-1 forward passes", for the ETA.
_TRAIN_COST_PER_IMAGE = 3.0
_FLOPS_COST = 3.0


class _ProgressHook(HookBase):
    def __init__(self, advance: Callable[[float], None], units: float):
        self._advance, self._units = advance, units

    def after_step(self) -> None:
        self._advance(self._units)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"cpu ({model or 'unknown'}, {os.cpu_count()} cores)"


class Measurer:
    """Builds each entry's config with the run-wide settings and measures it."""

    def __init__(self, settings: Any, output_dir: str):
        """
        Args:
            settings: a ``benchmark.Settings``.
            output_dir: rows run in ``<output_dir>/rows/<index>_<name>/``.
        """
        self.settings = settings
        self.output_dir = output_dir
        want = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        self.memory_method = "?"
        self.parallel = 1  # rows that trained at once (benchmark --jobs)
        self.iters: dict[str, int] = {}
        self.weight_rows: set[str] = set()
        self.train_sizes: set[str] = set()
        self.datasets: set[str] = set()
        self._latency_image: str | None = None
        self._grid_files: list[str] | None = None  # the images of the Visualizer grid
        self._backbones: dict[tuple, str] = {}  # (config, overrides, size) -> pre-trained file

    def build_cfg(self, entry: Any, output_dir: str):
        """The entry's config with its overrides, then the run-wide settings, then ``opts``.

        The settings scale some of the row's values (batch and LR, schedule, test size), so those
        are read from a first, unfinalised merge of the row; the config returned is then merged
        once with every key. (A second ``merge_config`` on the row's config would finalise with
        only its own keys explicit and re-derive what the row's YAML set, e.g. Panoptic FPN's
        ``INPUT.DATASET_MAPPER_NAME "detectron2"`` or an extra ``TEST.EVAL_TASKS`` entry.)
        """
        from common.engine import get_cfg, merge_config, setup_queryseg

        s = self.settings
        setup_queryseg()
        row = list(entry.overrides)
        cfg = merge_config(get_cfg(), entry.path, row, finalize=False)  # read below, then dropped
        forced: list[Any] = [
            "SEED",
            s.seed,
            "DATASETS.SHAPES.PRESET",
            s.preset,
            "DATALOADER.NUM_WORKERS",
            s.num_workers,
            "INPUT.MIN_SIZE_TEST",
            s.input_size,
            "INPUT.MAX_SIZE_TEST",
            max(cfg.INPUT.MAX_SIZE_TEST, s.input_size),
            "TEST.EVAL_PERIOD",
            0,
            "OUTPUT_DIR",
            output_dir,
            "MODEL.DEVICE",
            self.device.type,
        ]
        old_batch = cfg.SOLVER.IMS_PER_BATCH
        if s.ims_per_batch and old_batch != s.ims_per_batch:  # linear LR scaling rule
            forced += [
                "SOLVER.IMS_PER_BATCH",
                s.ims_per_batch,
                "SOLVER.BASE_LR",
                cfg.SOLVER.BASE_LR * s.ims_per_batch / old_batch,
            ]
        old_iter = cfg.SOLVER.MAX_ITER
        new_iter = s.max_iter or old_iter
        if entry.weights is not None:
            new_iter = s.timing_iters
        if new_iter != old_iter:
            r = new_iter / old_iter
            # LR steps and warm-up keep their place in the schedule (steps must stay < MAX_ITER)
            steps = tuple(
                step
                for step in (int(round(x * r)) for x in cfg.SOLVER.STEPS)
                if 0 < step < new_iter
            )
            forced += [
                "SOLVER.MAX_ITER",
                new_iter,
                "SOLVER.STEPS",
                steps,
                "SOLVER.WARMUP_ITERS",
                int(round(cfg.SOLVER.WARMUP_ITERS * r)),
            ]
        forced += ["SOLVER.CHECKPOINT_PERIOD", max(new_iter, 1) * 10]  # final checkpoint only
        for key, value in (
            ("IMAGE_SIZE", s.image_size),
            ("NUM_TRAIN", s.num_train),
            ("NUM_VAL", s.num_val),
        ):
            if value is not None:
                forced += [f"DATASETS.SHAPES.{key}", value]
        # the run-wide settings are the tool's, not the user's: the unused-key check skips them
        merged = merge_config(
            get_cfg(),
            entry.path,
            row + [str(x) for x in forced] + list(s.opts),
            tool_keys=map(str, forced[0::2]),
        )
        if s.backbone == "shapes" and entry.weights is None:
            if "MODEL.WEIGHTS" in list(s.opts)[0::2]:
                raise ValueError(
                    "MODEL.WEIGHTS is set for every row and the settings ask for the shapes-"
                    "pre-trained backbone (--backbone shapes): choose one"
                )
            frozen = merged.is_frozen()
            merged.defrost()
            merged.MODEL.WEIGHTS = self.pretrained_backbone(entry, merged)
            if frozen:
                merged.freeze()
        return merged

    def pretrained_backbone(self, entry: Any, row_cfg) -> str:
        """The `shapes`-pre-trained backbone file for ``entry`` (keys under its model's own
        bottom-up prefix), after checking that it initialises exactly that network: every key,
        every shape. Pre-trains it first when it is not cached yet (in this process)."""
        if __package__:  # tools.bench_core (tests); as a script's import, tools/ is on sys.path
            from .pretrain_shapes_backbone import benchmark_backbone, bottom_up
        else:
            from pretrain_shapes_backbone import benchmark_backbone, bottom_up

        size = self.settings.image_size or row_cfg.DATASETS.SHAPES.IMAGE_SIZE
        key = (entry.path, tuple(entry.overrides), size)
        if key not in self._backbones:
            from detectron2.modeling import build_model

            from common.convert.core import load_checkpoint_file

            cfg = row_cfg.clone()
            cfg.defrost()
            cfg.MODEL.DEVICE = "cpu"
            with torch.random.fork_rng():  # the rows' RNG state is the benchmark's to set
                net, prefix = bottom_up(build_model(cfg))
            path = benchmark_backbone(size, prefix)
            theirs = {k: tuple(v.shape) for k, v in load_checkpoint_file(path)["model"].items()}
            ours = {prefix + k: tuple(v.shape) for k, v in net.state_dict().items()}
            if theirs != ours:
                diff = sorted(set(theirs.items()) ^ set(ours.items()))[:5]
                raise ValueError(
                    f"{entry.name}: its backbone ({entry.config}) is not the R18-GN that "
                    f"--backbone shapes pre-trains ({path}); first differences (key, shape): {diff}"
                )
            self._backbones[key] = path
        return self._backbones[key]

    def cost(self, entry: Any) -> tuple[float, float]:
        """Estimated cost of an entry for the ETA: (batch-1 forward passes, cost of one pass).

        The cost of a pass is 1 + the GFLOPs of the untrained model on a random input (a rough
        but cheap prior: the R-CNN baselines' passes cost far more than the query-based ones').
        """
        from detectron2.modeling import build_model

        s = self.settings
        try:
            cfg = self.build_cfg(entry, self.output_dir)
        except Exception:  # reported when the entry runs; any estimate will do here
            return 1.0, 1.0
        iters = s.timing_iters if entry.weights is not None else cfg.SOLVER.MAX_ITER
        passes = (
            iters * cfg.SOLVER.IMS_PER_BATCH * _TRAIN_COST_PER_IMAGE
            + cfg.DATASETS.SHAPES.NUM_VAL
            + s.warmup
            + s.repeats
            + _FLOPS_COST
            + 1
        )
        try:
            image = torch.randint(0, 256, (3, s.input_size, s.input_size), dtype=torch.uint8)
            inputs = [{"image": image, "height": s.input_size, "width": s.input_size}]
            weight = 1.0 + count_gflops(build_model(cfg), inputs)[0]
        except Exception:  # same: the row reports its own errors
            weight = 1.0
        return passes, weight

    def latency_inputs(self, cfg) -> list[dict]:
        """The fixed batch-1 input: the first test image, resized to input_size x input_size."""
        import cv2
        from detectron2.data import DatasetCatalog
        from detectron2.data import detection_utils as utils

        if is_video_dataset(cfg.DATASETS.TEST[0]):
            return video_latency_inputs(cfg, self.settings.input_size)
        if self._latency_image is None:
            self._latency_image = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
        image = utils.read_image(self._latency_image, format=cfg.INPUT.FORMAT)
        size = self.settings.input_size
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        if image.ndim == 2:
            image = image[:, :, None]
        tensor = torch.as_tensor(image.transpose(2, 0, 1).copy())
        return [{"image": tensor, "height": size, "width": size}]

    def panels(self, cfg, model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
        """Detectron2 Visualizer overlays of ``GRID_IMAGES`` fixed test images (the first with
        at least two things, chosen at the first row, the same files for every row), drawn at
        >= ``GRID_PANEL`` px: (predictions, ground truth), one [H,W,3] uint8 RGB array each.
        """
        import copy

        from detectron2.data import DatasetCatalog, MetadataCatalog
        from detectron2.data import detection_utils as utils

        from common.data.mappers import build_mapper
        from common.engine.visualization import draw_ground_truth, draw_predictions

        name = cfg.DATASETS.TEST[0]
        dicts = DatasetCatalog.get(name)
        if self._grid_files is None:

            def things(d: dict) -> int:
                return len(
                    d.get("annotations")
                    or [s for s in d.get("segments_info", []) if s.get("isthing")]
                )

            busy = [d for d in dicts if things(d) >= 2] or dicts
            self._grid_files = [d["file_name"] for d in busy[:GRID_IMAGES]]
        by_stem = {os.path.splitext(os.path.basename(d["file_name"]))[0]: d for d in dicts}
        mapper = build_mapper(cfg, is_train=False)
        meta = MetadataCatalog.get(name)
        preds, gts = [], []
        model.eval()
        with torch.no_grad():
            for f in self._grid_files:
                d = by_stem[os.path.splitext(os.path.basename(f))[0]]
                image = utils.read_image(d["file_name"], format="RGB")
                scale = max(1.0, GRID_PANEL / min(image.shape[:2]))
                inputs = mapper(copy.deepcopy(d))
                inputs.pop("instances", None)
                inputs.pop("sem_seg", None)
                inputs["height"], inputs["width"] = image.shape[:2]
                outputs = model([inputs])[0]
                preds.append(
                    draw_predictions(image, outputs, meta, score_threshold=GRID_SCORE, scale=scale)
                )
                gt = {
                    k: v
                    for k, v in d.items()
                    if k != "sem_seg_file_name" or "pan_seg_file_name" not in d
                }  # panoptic: draw the segments once
                gts.append(draw_ground_truth(image, gt, meta, scale=scale))
        return preds, gts

    def train(
        self, cfg, entry: Any, advance: Callable[[float], None], checkpoint: str | None = None
    ):
        """Train (or time ``timing_iters`` iterations and load ``entry.weights``; or, given
        ``checkpoint``, the row's own training done elsewhere, just load it).

        Returns:
            (model, median seconds per training iteration or None).
        """
        from detectron2.engine.hooks import EvalHook
        from detectron2.utils.env import seed_all_rng

        from common.engine import Trainer

        class _NoEvalTrainer(Trainer):
            """The project's Trainer without the evaluation DefaultTrainer runs after the last
            iteration: the benchmark evaluates once, itself, with progress reporting."""

            def build_hooks(self):
                return [h for h in super().build_hooks() if not isinstance(h, EvalHook)]

        seed_all_rng(self.settings.seed)
        s_iter = None
        Trainer.dry_check_config(cfg)  # a key the row sets must change the row
        if checkpoint is not None:
            from common.engine.checkpoint import QSCheckpointer

            model = Trainer.build_model(cfg)
            QSCheckpointer.from_config(cfg, model).load(checkpoint)
            return model, None
        if cfg.SOLVER.MAX_ITER > 0:
            trainer = _NoEvalTrainer(cfg)
            units = cfg.SOLVER.IMS_PER_BATCH * _TRAIN_COST_PER_IMAGE
            trainer.register_hooks([_ProgressHook(advance, units)])
            trainer.resume_or_load(resume=False)
            trainer.train()
            times = [v for v, _ in trainer.storage.history("time").values()]
            s_iter = statistics.median(times) if times else float("nan")
            model = trainer.model
            del trainer  # stops the training loader's workers
            gc.collect()
        else:
            model = Trainer.build_model(cfg)
        if entry.weights is not None:
            from common.engine.checkpoint import QSCheckpointer

            QSCheckpointer.from_config(cfg, model).load(entry.weights)
        return model, s_iter

    def evaluate(self, cfg, model: torch.nn.Module, advance: Callable[[float], None]) -> dict:
        """Results of the project's evaluators on every ``cfg.DATASETS.TEST`` dataset."""
        from detectron2.evaluation import inference_on_dataset

        from common.engine import Trainer

        results: dict[str, Any] = {}
        for name in cfg.DATASETS.TEST:
            loader = Trainer.build_test_loader(cfg, name)
            evaluator = Trainer.build_evaluator(cfg, name)
            res = inference_on_dataset(
                model, loader, evaluator, callbacks={"after_inference": lambda: advance(1)}
            )
            for task, metrics in (res or {}).items():
                results.setdefault(task, metrics)
        return results

    def header(self, elapsed_s: float) -> dict[str, str]:
        """The run-wide settings, as stated in the table header and the CSV."""
        s = self.settings
        iters = sorted(set(self.iters.values()))
        # the cache folders of the pre-trained backbone(s) the rows loaded (their settings)
        pretrained = ", ".join(sorted({os.path.basename(os.path.dirname(p))
                                       for p in self._backbones.values()}))  # fmt: skip
        if s.max_iter:
            sched = f"{s.schedule}: {s.max_iter} iterations for every row"
        else:
            sched = f"{s.schedule}: each config's own schedule ({', '.join(map(str, iters))} it.)"
        if self.weight_rows:
            sched += (
                f"; rows with a checkpoint ({', '.join(sorted(self.weight_rows))}): "
                f"{s.timing_iters} timed training iterations, then the checkpoint"
            )
        return {
            "device": _device_name(self.device),
            "torch": torch.__version__,
            "threads": str(torch.get_num_threads()),
            "seed": (
                f"{', '.join(map(str, s.seeds))} (one run per seed; mean ± std)"
                if len(s.seeds) > 1
                else str(s.seed)
            ),
            "loader": f"{s.ims_per_batch} images/batch, {s.num_workers} workers",
            "init": (
                f"R18-GN backbone pre-trained once on shapes crops ({pretrained or '?'}), "
                "the rest from scratch"
                if s.backbone == "shapes"
                else "from scratch"
            ),
            "schedule": sched,
            "dataset": "; ".join(sorted(self.datasets)) or "?",
            "train_sizes": " | ".join(sorted(self.train_sizes)) or "?",
            "input": f"{s.input_size}x{s.input_size}, batch 1",
            "latency": f"median of {s.repeats} runs after {s.warmup} warm-up runs",
            "gflops": "fvcore, 1 multiply-add = 1 FLOP, uncounted ops listed in log.txt",
            "memory": self.memory_method,
            "train_s_iter": "median per-iteration time, data loading incl., first 3 excluded"
            + (
                f"; {self.parallel} rows trained at once, "
                f"{max(1, (os.cpu_count() or 1) // self.parallel)}"
                " thread(s) each"
                if self.parallel > 1
                else ""
            ),
            "elapsed": f"{elapsed_s / 60:.1f} min",
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }


def is_video_dataset(name: str) -> bool:
    """Whether a registered dataset holds videos (YouTube-VIS format, ``evaluator_type`` ytvis)."""
    from detectron2.data import MetadataCatalog

    return MetadataCatalog.get(name).get("evaluator_type") == "ytvis"


def video_latency_inputs(cfg, size: int) -> list[dict]:
    """A video model's fixed batch-1 input: the first test clip, every frame resized to
    ``size`` x ``size`` (latency and GFLOPs are then per clip; the table says so)."""
    import cv2
    from detectron2.data import DatasetCatalog
    from detectron2.data import detection_utils as utils

    video = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]
    images = []
    for path in video["file_names"]:
        image = cv2.resize(utils.read_image(path, format=cfg.INPUT.FORMAT), (size, size))
        images.append(torch.as_tensor(image.transpose(2, 0, 1).copy()))
    return [{"images": images, "height": size, "width": size, "video_id": video["video_id"]}]


def dataset_description(cfg) -> str:
    """The table header's data line for a row: the `shapes` (or `shapes_vis`) settings."""
    names = (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST)
    if any(is_video_dataset(n) for n in names):
        v = cfg.DATASETS.SHAPES_VIS
        return (
            f"shapes_vis, preset {v.PRESET}, {v.IMAGE_SIZE} px, {v.NUM_TRAIN} train / "
            f"{v.NUM_VAL} val clips of {v.NUM_FRAMES} frames (latency, GFLOPs: per clip)"
        )
    sh = cfg.DATASETS.SHAPES
    return (
        f"shapes, preset {sh.PRESET}, {sh.IMAGE_SIZE} px, {sh.NUM_TRAIN} "
        f"train / {sh.NUM_VAL} val images"
    )


def row_dir(output_dir: str, index: int, name: str, tag: str = "") -> str:
    """``<output_dir>/rows/<index>_<name>[_<tag>]``: where one row (one seed) runs."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    return os.path.join(output_dir, "rows", f"{index:02d}_{slug}" + (f"_{tag}" if tag else ""))


def _train_job(settings: Any, entry: Any, out_dir: str, threads: int) -> tuple[str, float]:
    """One row's training in a worker process (``train_parallel``): returns (checkpoint,
    median s/iter). Logs to ``<out_dir>/log.txt``."""
    from common.data.shapes import configure_shapes_from_cfg

    torch.set_num_threads(threads)
    os.makedirs(out_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(out_dir, "log.txt"))
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:  # a worker runs several rows: each row's log goes to its own file only
        measurer = Measurer(settings, os.path.dirname(out_dir))
        cfg = measurer.build_cfg(entry, out_dir)
        cfg.freeze()
        configure_shapes_from_cfg(cfg, generate=True)
        _, s_iter = measurer.train(cfg, entry, lambda _: None)
    finally:
        root.removeHandler(handler)
        handler.close()
    checkpoint = os.path.join(out_dir, "model_final.pth")
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{entry.name}: training wrote no {checkpoint}")
    return checkpoint, s_iter


def train_parallel(
    jobs: Sequence[tuple[Any, Any, str]],
    workers: int,
    on_done: Callable[[int], None],
    order: Sequence[int] | None = None,
) -> dict[int, tuple[str, float] | str]:
    """Train rows in ``workers`` processes at once (each with cores // workers threads).

    Args:
        jobs: (settings, entry, out_dir) per row and seed to train.
        on_done: called with a job's index when it finishes.
        order: the order in which jobs are started (e.g. the longest first, so that the last
            one to finish does not start last); default: as given.
    Returns:
        job index -> (checkpoint, s/iter), or an error message.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    done: dict[int, tuple[str, float] | str] = {}
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        order = order if order is not None else range(len(jobs))
        futures = {pool.submit(_train_job, *jobs[i], threads): i for i in order}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                done[i] = fut.result()
            except Exception as e:  # recorded in the row, as measure_row records its errors
                done[i] = f"{type(e).__name__}: {e}"
                logger.error("%s: training failed: %s", jobs[i][1].name, done[i])
            on_done(i)
    return done


def measure_row(
    measurer: Measurer,
    entry: Any,
    bar: Any,
    tag: str = "",
    trained: tuple[str, float] | str | None = None,
) -> dict[str, Any]:
    """Run and measure one entry; a failure is logged and recorded in the row's ``error``.
    ``tag`` (e.g. the seed) is appended to the row's output folder; ``trained`` is the row's
    (checkpoint, s/iter) from ``train_parallel`` (or its error), so it is not trained here."""
    row: dict[str, Any] = {
        "name": entry.name,
        "method": entry.method or entry.name,
        "config": entry.config,
        "weights": entry.weights or "",
    }
    row.update({k: None for k, _ in (*COLUMNS[1:], *VIDEO_COLUMNS)})
    row["task"] = "?"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = row_dir(measurer.output_dir, bar.row_index, entry.name, tag)
    try:
        if isinstance(trained, str):
            raise RuntimeError(f"training failed: {trained}")
        from common.data.shapes import configure_shapes_from_cfg

        cfg = measurer.build_cfg(entry, out_dir)
        cfg.freeze()
        configure_shapes_from_cfg(cfg, generate=True)
        measurer.datasets.add(dataset_description(cfg))
        sizes = tuple(cfg.INPUT.MIN_SIZE_TRAIN)
        measurer.train_sizes.add(f"{sizes} max {cfg.INPUT.MAX_SIZE_TRAIN}")
        if entry.weights is None:
            measurer.iters[entry.name] = cfg.SOLVER.MAX_ITER
        else:
            measurer.weight_rows.add(entry.name)
        bar.stage("train" if entry.weights is None else "time training + load weights")
        if trained is not None:
            model, _ = measurer.train(cfg, entry, bar.advance, checkpoint=trained[0])
            row["train_s_iter"] = trained[1]
        else:
            model, row["train_s_iter"] = measurer.train(cfg, entry, bar.advance)
        logger.info(
            "%s: trained in %.0f s wall, %.0f s CPU",
            entry.name,
            time.perf_counter() - wall0,
            time.process_time() - cpu0,
        )
        bar.stage("evaluate")
        results = measurer.evaluate(cfg, model, bar.advance)
        logger.info(
            "%s: evaluated, %.0f s wall, %.0f s CPU so far",
            entry.name,
            time.perf_counter() - wall0,
            time.process_time() - cpu0,
        )
        metrics = extract_metrics(results)
        for k, v in metrics.items():
            if v is not None and math.isnan(v):  # Detectron2's "no predictions from the model"
                metrics[k] = 0.0
                row["note"] = f"no predictions above the score threshold: {k} counted as 0"
        row.update(metrics)
        row["task"] = task_of(results)
        if measurer.settings.grid:
            try:
                row["_panels"], row["_gt_panels"] = measurer.panels(cfg, model)
            except Exception as e:  # a picture is not worth losing the row's numbers
                logger.warning("%s: no Visualizer panels (%s: %s)", entry.name, type(e).__name__, e)
        model.eval()
        inputs = measurer.latency_inputs(cfg)
        row["params_m"] = count_parameters(model) / 1e6
        bar.stage("GFLOPs")
        try:
            row["gflops"], unsupported = count_gflops(model, inputs)
            if unsupported:
                logger.info("%s: ops not counted by fvcore: %s", entry.name, unsupported)
        except Exception as e:  # tracing can fail on data-dependent code: keep the other columns
            logger.warning("%s: GFLOPs not measured (%s: %s)", entry.name, type(e).__name__, e)
            row["gflops"] = float("nan")
        bar.advance(_FLOPS_COST)
        bar.stage("latency")
        dev = measurer.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
        with torch.no_grad():
            stats = measure_latency(
                lambda: model(inputs),
                warmup=measurer.settings.warmup,
                repeats=measurer.settings.repeats,
                synchronize=sync,
                on_call=lambda: bar.advance(1),
            )
            row["latency_ms"] = stats.median_ms
            row["memory_mb"], measurer.memory_method = peak_memory_mb(
                lambda: model(inputs), model, dev
            )
        bar.advance(1)
        if row["train_s_iter"] is None:
            row["train_s_iter"] = float("nan")
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        logger.error("%s failed: %s", entry.name, row["error"])
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
    # wall and this process's CPU seconds: on a shared machine CPU / threads estimates idle wall
    row["wall_s"] = time.perf_counter() - wall0
    row["cpu_s"] = time.process_time() - cpu0
    logger.info(
        "%s: %.0f s wall, %.0f s CPU (train %s s/iter)",
        entry.name,
        row["wall_s"],
        row["cpu_s"],
        fmt(row["train_s_iter"], 3),
    )
    bar.finish_row()
    return row


#: metric columns that are averaged over seeds
_METRICS = ("AP", "PQ", "mIoU", "box_AP", "PQ_th", "PQ_st", "vAP", "vAR10", "IDSW")


def aggregate_seeds(runs: Sequence[dict], seeds: Sequence[int]) -> dict[str, Any]:
    """One row from the runs of one entry under several seeds: metrics as the mean with
    ``<metric>_std`` (sample std) and ``<metric>_runs``; costs as the median; any failed run
    makes the row failed."""
    row = dict(runs[0])
    errors = [f"seed {s}: {r['error']}" for s, r in zip(seeds, runs) if r.get("error")]
    if errors:
        row["error"] = "; ".join(errors)
        return row
    for key in _METRICS:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, (int, float)) for v in values):
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values)
            row[f"{key}_runs"] = values
    for key in ("train_s_iter", "latency_ms", "memory_mb"):
        values = [r.get(key) for r in runs if isinstance(r.get(key), (int, float))]
        row[key] = statistics.median(values) if values else row.get(key)
    row["wall_s"] = sum(r.get("wall_s") or 0.0 for r in runs)
    row["cpu_s"] = sum(r.get("cpu_s") or 0.0 for r in runs)
    row["seeds"] = list(seeds)
    return row


class Progress:
    """One tqdm bar over the whole run, so that its ETA covers every row. Its unit is a row's
    estimated cost of one forward pass (see :meth:`Measurer.cost`); stages report passes."""

    def __init__(self, costs: Sequence[tuple[float, float]], enabled: bool = True):
        """
        Args:
            costs: per row, (forward passes, cost of one pass).
        """
        from tqdm import tqdm

        self._weights = [w for _, w in costs]
        self._costs = [p * w for p, w in costs]
        self._bar = tqdm(
            total=sum(self._costs),
            disable=not enabled,
            smoothing=0.0,
            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
        )
        self.row_index, self._row_name, self._done_before = 0, "", 0.0
        self.done = 0.0  # units done (tqdm stops counting when disabled)

    def start_row(self, index: int, name: str) -> None:
        self.row_index, self._row_name = index, name
        self._done_before = sum(self._costs[:index])
        self.stage("start")

    def stage(self, what: str) -> None:
        n = len(self._costs)
        self._bar.set_description_str(f"[{self.row_index + 1}/{n}] {self._row_name}: {what}")

    def advance(self, passes: float) -> None:
        """``passes`` forward passes of the current row are done."""
        limit = self._done_before + self._costs[self.row_index]
        self._move_to(min(self.done + passes * self._weights[self.row_index], limit))

    def finish_row(self) -> None:
        """Jump to the row's end (its estimate may have been off)."""
        self._move_to(self._done_before + self._costs[self.row_index])

    def _move_to(self, done: float) -> None:
        if done > self.done:
            self._bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        self._bar.close()

    @staticmethod
    def console_handler() -> logging.Handler:
        """A logging handler that prints above the bar instead of breaking it."""
        from tqdm import tqdm

        class _TqdmHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                tqdm.write(self.format(record))

        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        return handler
