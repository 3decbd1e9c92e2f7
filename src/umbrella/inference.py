"""`umbrella ask`: answer a question about one subject's scans with a trained model.

Scans are preprocessed exactly as in training (the model folder's ``preprocessing.json``).
A question worded as one of a built-in regression task's phrasings ("How old is this subject?
Answer in years.") is answered like ``umbrella evaluate`` does (``regression="expected"``: the mean
of the model's distribution over the task's candidate answers, :mod:`umbrella.evaluation.regression`);
any other question by greedy decoding.

    assistant = BrainAssistant("runs/sex__tiny__ab12cd34/seed_0")
    assistant.ask("What is the sex of this subject?", [("T1", "sub-01_T1w.nii.gz")])
    assistant.answer(question, images)   # + the trained task it matches, option probabilities
    assistant.show(question, images, answer, "answer.png")   # orthogonal slices + the answer
    interactive(assistant, images)                            # several questions, one model load
"""

from __future__ import annotations

import io
import textwrap
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from umbrella.data.catalog import load_preprocessing
from umbrella.data.fmri import take_window
from umbrella.data.prompts import PromptEncoder
from umbrella.data.records import IMAGE_PLACEHOLDER, ImageRef, Turn
from umbrella.errors import ConfigError, UmbrellaError, VolumeError
from umbrella.evaluation.regression import (
    METHODS,
    CandidateGrid,
    candidate_grid,
    regression_answers,
)
from umbrella.io import atomic_write_bytes
from umbrella.model.answering import generate_answers, score_options
from umbrella.model.build import load_brain_llava
from umbrella.task_registry import TaskSpec, task_for_question
from umbrella.tasks.known import load_tasks, match_task, task_spec, untrained_notice

TASKS_UNKNOWN = ("this model's tasks are unknown (it was trained before tasks.json was saved): "
                 "the answer is not checked against what it learned")


def resolve_model_dir(path: str | Path) -> Path:
    """A run folder (holding model/) or the model folder itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    raise ConfigError(f"{path} is neither a run folder (with model/) nor a model folder "
                      "(with config.json); pass the folder `umbrella train` printed")


@dataclass
class Answer:
    """One answer with what is known about it. ``task`` is the trained task the question matched
    (None: none, or tasks unknown); ``probs`` the likelihood-scored probability of each option of
    a classification task; ``value`` the number parsed from a regression answer. ``distribution``
    ({"values": [...], "probs": [...], "method", "mean", "median", "sd"}) is a regression task's
    distribution over candidate values (the listed, most probable candidates)."""

    text: str
    task: str | None = None
    kind: str | None = None
    known: bool | None = None  # None: the model's tasks are unknown
    notice: str | None = None
    probs: dict[str, float] | None = None
    value: float | None = None
    unit: str = ""
    distribution: dict | None = None


class BrainAssistant:
    """Keeps a model loaded to answer several questions. ``regression`` answers the questions of
    regression tasks (the trained task the question matches, else a built-in one): "expected" |
    "median" of the candidates' distribution, or "generate"; ``last_distribution`` holds the
    summary of the latest such answer (else None)."""

    MAX_LOADED = 32  # preprocessed inputs kept (least recently used dropped first)

    def __init__(self, model: str | Path, device: str = "cpu", regression: str = "expected",
                 regression_step: float | None = None):
        if regression not in METHODS:
            raise ConfigError(f"regression={regression!r}; choose one of {', '.join(METHODS)}")
        self.regression, self.regression_step = regression, regression_step
        self._grids: dict[str, CandidateGrid] = {}
        self.last_distribution: dict | None = None
        self.model_dir = resolve_model_dir(model)
        self.model, self.tokenizer = load_brain_llava(self.model_dir, device)
        self.encoder = PromptEncoder(self.tokenizer)
        self.inputs = load_preprocessing(self.model_dir)
        self.tasks = load_tasks(self.model_dir)  # None: trained before tasks.json existed
        # (modality, path) -> model input
        self._loaded: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def load_images(self, images: list[tuple[str, str | Path]]) -> list[tuple[str, torch.Tensor]]:
        """Model inputs, preprocessed as in training and kept so later questions reuse them:
        (1, D, H, W) for T1 / dMRI, the first window (1, D, H, W, L) of an rsfMRI run."""
        out = []
        for modality, path in images:
            if modality not in self.inputs:
                raise ConfigError(f"this model reads {', '.join(self.inputs)}, not {modality!r}")
            key = (modality, str(Path(path).resolve()))
            if key not in self._loaded:
                self._loaded[key] = self._preprocess(modality, Path(path))
                while len(self._loaded) > self.MAX_LOADED:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            out.append((modality, self._loaded[key]))
        return out

    def forget(self, path: str | Path) -> None:
        """Drop the preprocessed inputs of ``path`` (e.g. a deleted upload)."""
        resolved = str(Path(path).resolve())
        for key in [k for k in self._loaded if k[1] == resolved]:
            del self._loaded[key]

    def _preprocess(self, modality: str, path: Path) -> torch.Tensor:
        spec = self.inputs[modality]
        array = spec.preprocess(ImageRef(modality, path))
        if spec.is_fmri:
            array = take_window(array, spec.window_starts(array.shape[0])[0], spec.spec)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]

    def _sample(self, question: str, images: list[tuple[str, str | Path]]) -> dict:
        missing = len(images) - question.count(IMAGE_PLACEHOLDER)
        if missing < 0:
            raise ConfigError(f"the question has {question.count(IMAGE_PLACEHOLDER)} <image> "
                              f"placeholders but {len(images)} images were given")
        text = (IMAGE_PLACEHOLDER + "\n") * missing
        turns = (Turn("user", text + question), Turn("assistant", ""))
        return {"images": self.load_images(images), "turns": turns,
                "image_tokens": [self.inputs[m].tokens for m, _ in images]}

    def _regression_task(self, question: str, n_images: int) -> TaskSpec | None:
        """The regression task a question asks when it is answered from candidates: the trained
        task it matches (with the trained range), else a built-in task's wording; else None."""
        if self.regression == "generate":
            return None
        task = None
        if self.tasks is not None:
            name = match_task(question, self.tasks).task
            task = task_spec(self.tasks[name]) if name is not None else None
        task = task or task_for_question(question)
        if task is None or task.kind != "regression" or task.n_images != n_images:
            return None
        return task

    def _reply(self, question: str, images, max_new_tokens: int) -> tuple[str, dict, dict | None]:
        """(answer text, sample, regression distribution summary or None)."""
        sample = self._sample(question, images)
        task = self._regression_task(question, len(images))
        if task is None:
            return generate_answers(self.model, self.encoder, [sample], max_new_tokens)[0], \
                sample, None
        if task.name not in self._grids:
            self._grids[task.name] = candidate_grid(task, self.regression_step)
        text, summary = regression_answers(self.model, self.encoder, [sample], task,
                                           self._grids[task.name], self.regression)[0]
        return text, sample, summary

    def ask(self, question: str, images: list[tuple[str, str | Path]],
            max_new_tokens: int = 32) -> str:
        """One answer. ``<image>`` placeholders are prepended for images the question lacks."""
        text, _, self.last_distribution = self._reply(question, images, max_new_tokens)
        return text

    def notice(self, question: str) -> tuple[str | None, str | None]:
        """(trained task the question matches or None, notice or None): the notice says that
        the question matches no trained task, or that the model's tasks are unknown."""
        if self.tasks is None:
            return None, TASKS_UNKNOWN
        match = match_task(question, self.tasks)
        if match.task is None:
            return None, untrained_notice(question, self.tasks)
        return match.task, None

    def answer(self, question: str, images: list[tuple[str, str | Path]],
               max_new_tokens: int = 32) -> Answer:
        """The answer, the trained task it belongs to and, for a classification task, each
        option's probability (likelihood scoring over the options, as `evaluate` does); for a
        regression task the model's distribution over candidate values."""
        text, sample, summary = self._reply(question, images, max_new_tokens)
        self.last_distribution = summary
        task, notice = self.notice(question)
        out = Answer(text, task=task, known=None if self.tasks is None else task is not None,
                     notice=notice)
        spec = task_spec(self.tasks[task]) if task is not None else None
        if spec is None:
            return out
        out.kind, out.unit = spec.kind, spec.unit
        if spec.kind == "classification":
            scores = score_options(self.model, self.encoder, [sample], [list(spec.options)])[0]
            probs = torch.softmax(scores, 0).tolist()
            out.probs = {o: float(p) for o, p in zip(spec.options, probs, strict=True)}
        else:
            value = spec.parse(text)
            out.value = None if value is None else float(value)
            if summary is not None:
                out.distribution = {"values": [float(v) for v, _ in summary["probs"]],
                                    "probs": [float(q) for _, q in summary["probs"]],
                                    "method": self.regression,
                                    **{k: summary[k] for k in ("mean", "median", "sd")
                                       if k in summary}}
        return out

    def show(self, question: str, images: list[tuple[str, str | Path]], answer: str | None,
             out_png: str | Path, max_new_tokens: int = 32) -> Path:
        """Write a PNG of orthogonal slices of each input beside the question and ``answer``
        (asked first when ``answer`` is None). Returns the PNG's path."""
        if answer is None:
            answer = self.ask(question, images, max_new_tokens)
        return show_slices(images, question, answer, out_png)


# ----------------------------------------------------------------------------- figures

def display_volume(path: str | Path) -> np.ndarray:
    """(X, Y, Z) float32 in RAS+ order for display; a 4D series is averaged over time."""
    path = Path(path)
    if not path.is_file():
        raise VolumeError("file not found" if not path.exists() else "not a NIfTI file (a frame "
                          "folder cannot be shown)", path=path,
                          fix="pass the NIfTI file given to --image")
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise VolumeError(f"cannot read for display ({type(exc).__name__}: {exc})", path=path,
                          fix="check the file with `nib-ls` or re-convert it") from exc
    if data.ndim < 3:
        raise VolumeError(f"expected a 3D or 4D image, got shape {data.shape}", path=path,
                          fix="pass a 3D (T1, dMRI map) or 4D (rsfMRI) NIfTI")
    data = data.reshape(data.shape[:3] + (-1,)).mean(axis=3)
    return np.nan_to_num(data)


def orthogonal_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Central axial (x-y), coronal (x-z) and sagittal (y-z) slices of an (X, Y, Z) RAS+ volume,
    transposed so that rows run top to bottom when drawn with ``origin="lower"``."""
    x, y, z = (n // 2 for n in volume.shape)
    return {"axial": volume[:, :, z].T, "coronal": volume[:, y, :].T,
            "sagittal": volume[x, :, :].T}


def show_slices(images: list[tuple[str, str | Path]], question: str, answer: str,
                out_png: str | Path) -> Path:
    """PNG: one row per input (axial, coronal, sagittal) and the question / answer at the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not images:
        raise ConfigError("show needs at least one image (MODALITY=PATH)")
    n = len(images)
    fig = Figure(figsize=(11, 2.8 * n + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(n, 4, width_ratios=[1, 1, 1, 1.3])
    for row, (modality, path) in enumerate(images):
        volume = display_volume(path)
        lo, hi = np.percentile(volume, [1, 99.5])
        for col, (view, plane) in enumerate(orthogonal_slices(volume).items()):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(plane, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
            ax.set_axis_off()
            ax.set_title(f"{modality} {view}" if col else f"{modality} {view}\n{Path(path).name}",
                         fontsize=8)
    text = fig.add_subplot(grid[:, 3])
    text.set_axis_off()
    body = "Q: " + "\n".join(textwrap.wrap(question.replace("<image>", "").strip(), 38)) + \
        "\n\nA: " + "\n".join(textwrap.wrap(answer, 38) or [""])
    text.text(0.0, 0.95, body, va="top", ha="left", fontsize=10, family="monospace",
              transform=text.transAxes)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(out_png), buf.getvalue())


# ----------------------------------------------------------------------------- interactive

def interactive(assistant: BrainAssistant, images: list[tuple[str, str | Path]], *,
                input_fn: Callable[[str], str] = input, print_fn: Callable[[str], None] = print,
                max_new_tokens: int = 32, show_dir: str | Path | None = None,
                prompt: str = "question> ") -> list[tuple[str, str]]:
    """Ask questions about ``images`` until an empty line or EOF, with the model and the
    preprocessed scans kept loaded. A failing question prints its error and the loop goes on.
    With ``show_dir``, each answer's slice figure is written there (answer_01.png, ...).
    Returns the (question, answer) pairs."""
    assistant.load_images(images)  # bad paths fail before the first question
    transcript: list[tuple[str, str]] = []
    while True:
        try:
            question = input_fn(prompt)
        except (EOFError, KeyboardInterrupt):
            break
        if question is None or not question.strip():
            break
        try:
            answer = assistant.ask(question.strip(), images, max_new_tokens)
        except UmbrellaError as exc:
            print_fn(f"error: {exc}")
            continue
        transcript.append((question.strip(), answer))
        print_fn(answer)
        if show_dir is not None:
            png = assistant.show(question.strip(), images, answer,
                                 Path(show_dir) / f"answer_{len(transcript):02d}.png")
            print_fn(f"(figure: {png})")
    return transcript
