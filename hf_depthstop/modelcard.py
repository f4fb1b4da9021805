# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Model cards of `DepthStop*` models, rendered with `huggingface_hub.ModelCard` from the package's template.

A card holds metadata (base model, datasets, `library_name`, tags with `early-exit`, pipeline tag), and four
generated blocks between `<!-- hf_depthstop:begin NAME -->` / `<!-- hf_depthstop:end NAME -->` markers:

- `usage`: loading with the package installed (registered Auto classes) and with plain transformers
  (`trust_remote_code=True`), and reading the per-example exits;
- `exits`: the exit layers (0-based) and the stopping rule with its parameters;
- `calibration`: the rule table of `config.calibration` (rule, setting, accuracy, mean exit layer, compute, FLOPs
  speed-up, on the calibration split) and the accuracy-vs-compute plot, saved next to the card;
- `measured`: live rule tables measured on a test split (accuracy, exits, compute, wall-clock speed-up), from the
  `measured` argument or the `depthstop_results.json` that `recipes/train_classifier.py` writes.

Re-saving a folder that already has a README.md updates the metadata and the generated blocks and keeps every other
line (the hand-written prose). A card without markers (e.g. written by hand or by the stock Trainer) keeps its text
and gets the blocks appended.
"""

import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import logging

from .calibration import CalibrationReport
from .evaluation import rules_table_markdown


logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard_template.md"
PLOT_FILENAME = "depthstop_accuracy_vs_compute.png"
RESULTS_FILENAME = "depthstop_results.json"
BLOCKS = {"usage": "How to use", "exits": "Early exit", "calibration": "Accuracy and compute", "measured": "Measured"}
PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForCausalLM": "text-generation",
}
PROCESSORS = {
    "text-classification": ("AutoTokenizer", 'inputs = processor(["an example sentence"], return_tensors="pt")'),
    "image-classification": ("AutoImageProcessor", 'inputs = processor(images=[image], return_tensors="pt")'),
    "text-generation": ("AutoTokenizer", 'inputs = processor(["Once upon a time"], return_tensors="pt")'),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _block(name: str, body: str) -> str:
    return f"<!-- hf_depthstop:begin {name} -->\n{body.strip()}\n<!-- hf_depthstop:end {name} -->"


def _block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- hf_depthstop:begin {name} -->\n.*?\n<!-- hf_depthstop:end {name} -->", re.DOTALL)


def _auto_class(config) -> str | None:
    auto_map = getattr(config, "auto_map", None) or {}
    return next((name for name in auto_map if name != "AutoConfig"), None)


def _exit_layers_text(config) -> str:
    layers = list(config.exit_layers)
    total = getattr(config, "num_hidden_layers", None)
    return f"{layers} (0-based; {len(layers)} exits" + (f" over {total} layers)" if total else ")")


def usage_markdown(config, repo_id: str | None) -> str:
    """The usage snippets: with `hf_depthstop` installed, and with plain transformers (`trust_remote_code=True`)."""
    repo = repo_id or "<repo_id>"
    auto = _auto_class(config) or "AutoModel"
    processor, example = PROCESSORS.get(PIPELINE_TAGS.get(auto, ""), ("AutoTokenizer", "inputs = processor(...)"))
    return (
        "With `hf_depthstop` installed (importing it registers its classes with the Auto classes):\n\n"
        "```python\n"
        "import hf_depthstop\n"
        f"from transformers import {auto}, {processor}\n\n"
        f'model = {auto}.from_pretrained("{repo}").eval()\n'
        f'processor = {processor}.from_pretrained("{repo}")\n'
        f"{example}\n"
        "out = model(**inputs)\n"
        "out.logits, out.exit_layer, out.compute_fraction  # per example; exit_layer is 0-based\n"
        "```\n\n"
        "With plain transformers (the repo carries the modeling code):\n\n"
        "```python\n"
        f"from transformers import {auto}\n\n"
        f'model = {auto}.from_pretrained("{repo}", trust_remote_code=True)\n'
        "```\n\n"
        'Change the rule at run time with `model.set_stopping_rule("confidence", threshold=0.9)`; `"none"` runs the '
        "full model."
    )


def exits_markdown(config) -> str:
    """Exit layers, pooling and the stopping rule (with the calibration target it was chosen for)."""
    params = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.stopping_params.items()
    )
    lines = [
        "| | |",
        "|---|---|",
        f"| exit layers | {_exit_layers_text(config)} |",
    ]
    if getattr(config, "exit_pooling", None):
        lines.append(f"| exit pooling | {config.exit_pooling} |")
    lines.append(f"| stopping rule | `{config.stopping_rule}`" + (f" ({params})" if params else "") + " |")
    calibration = getattr(config, "calibration", None) or {}
    if calibration:
        target = calibration.get("target")
        lines.append(
            f"| calibrated for | {calibration.get('target_type')} = {target} on {calibration.get('num_examples')} "
            "held-out examples |"
        )
    return "\n".join(lines) + (
        "\n\nEach example runs layer by layer; after every exit layer the rule decides whether to stop there. "
        "Examples that stop leave the batch, so the remaining layers run on fewer rows (real compute savings)."
    )


def calibration_markdown(config, plot: bool) -> str:
    """The calibration table of `config.calibration` and the plot link; a how-to line when not calibrated."""
    calibration = getattr(config, "calibration", None) or {}
    if not calibration.get("table"):
        return (
            "Not calibrated yet: run `hf_depthstop.calibrate(model, validation_set)` and save again to get the "
            "rule table (accuracy, mean exit layer, compute, speed-up) here."
        )
    if "agreement" in calibration["table"][0]:  # a decoder LM (`calibrate_lm`): agreement with full-depth tokens
        return lm_calibration_markdown(calibration, plot)
    report = CalibrationReport(
        config.stopping_rule, calibration.get("target_type", ""), float(calibration.get("target", 0.0)),
        calibration["full_accuracy"], calibration["table"], calibration.get("settings", {}),
        calibration["oracle_floor"], calibration.get("temperatures", []),
    )
    text = (
        f"Every rule at its calibrated setting, on the calibration split ({calibration.get('num_examples')} examples; "
        "offline simulation with the model's own rule code). Accuracy in %, drop in points vs full depth, mean exit "
        "layer 0-based, compute = FLOPs used / full model, speed-up = 1 / compute. The oracle floor stops each "
        "example at the first exit after which its prediction never changes.\n\n" + report.to_markdown()
    )
    if plot:
        text += f"\n\n![Accuracy vs compute]({PLOT_FILENAME})"
    return text


def lm_calibration_markdown(calibration: dict, plot: bool) -> str:
    """The table of a decoder LM's calibration (`hf_depthstop.calibrate_lm`): per rule, the teacher-forced agreement
    of the exited token with the full-depth token on held-out text."""
    lines = [
        f"Every rule at its calibrated setting on held-out text ({calibration.get('num_tokens')} tokens, teacher "
        "forced; target: agreement >= "
        f"{100 * (1 - float(calibration.get('target', 0.0))):.0f}% with full depth). Mean exit layer 0-based, "
        "compute = FLOPs used / full model (every evaluated exit pays for its head: adapter and LM-head product).",
        "",
        "| rule | setting | token agreement (%) | mean exit layer | compute | FLOPs speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in [*calibration["table"], calibration["oracle_floor"]]:
        setting = "" if row["setting"] is None else f"{row['setting']:.4g}"
        lines.append(
            f"| {row['rule']} | {setting} | {100 * row['agreement']:.2f} | {row['mean_exit_layer']:.2f} | "
            f"{row['compute_fraction']:.3f} | {1 / row['compute_fraction']:.2f}x |"
        )
    if plot:
        lines += ["", f"![Agreement vs compute]({PLOT_FILENAME})"]
    return "\n".join(lines)


def measured_markdown(measured: dict[str, list[dict]]) -> str:
    """Live rule tables, one per setting (e.g. `{"test, batch 64": rows}` with rows of `compare_rules`)."""
    parts = []
    for label, rows in measured.items():
        parts.append(f"**{label}** (every rule live; measured speed-up = wall-clock of `none` / of the rule)")
        parts.append(rules_table_markdown(rows))
    return "\n\n".join(parts)


def load_measured(folder: str | os.PathLike) -> dict[str, list[dict]] | None:
    """Measured rule tables from `folder/depthstop_results.json` (written by `recipes/train_classifier.py`)."""
    path = Path(folder, RESULTS_FILENAME)
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    tables = results.get("test") or {}
    return {f"test split, {key.replace('_', ' ')}": rows for key, rows in tables.items() if rows} or None


def plot_accuracy_vs_compute(config, path: str | os.PathLike, measured: dict[str, list[dict]] | None = None) -> bool:
    """Save the accuracy-vs-compute plot (PNG) of the calibration table (and measured rows). Returns whether there
    was anything to plot. Uses matplotlib's Agg canvas directly (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    calibration = getattr(config, "calibration", None) or {}
    series = []
    if calibration.get("table"):
        series.append(("calibration split", [*calibration["table"], calibration["oracle_floor"]], "o"))
    for label, rows in (measured or {}).items():
        series.append((label, rows, "s"))
    if not series:
        return False
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (label, rows, marker) in enumerate(series):
        x = [row["compute_fraction"] for row in rows]
        y = [100 * row.get("accuracy", row.get("agreement", float("nan"))) for row in rows]
        if marker == "s":  # measured: hollow squares
            axes.scatter(x, y, marker=marker, label=label, facecolors="none", edgecolors=f"C{i}")
        else:
            axes.scatter(x, y, marker=marker, label=label, color=f"C{i}")
        for row, xi, yi in zip(rows, x, y):
            axes.annotate(row["rule"], (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    axes.set_xlabel("compute (FLOPs used / full model)")
    lm = bool(calibration.get("table")) and "agreement" in calibration["table"][0]
    axes.set_ylabel("token agreement with full depth (%)" if lm else "accuracy (%)")
    axes.set_title(f"{config.model_type}: accuracy vs compute per stopping rule")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return True


def _card_data(existing: ModelCardData | None, config, base_model, datasets, tags, language, license) -> ModelCardData:
    data = existing if existing is not None else ModelCardData()
    auto = _auto_class(config)
    data.library_name = "transformers"
    if PIPELINE_TAGS.get(auto):
        data.pipeline_tag = PIPELINE_TAGS[auto]
    if base_model is None and not data.base_model:
        name = getattr(config, "_name_or_path", "") or ""
        if _HUB_ID.match(name) and not os.path.exists(name):
            base_model = name
    if isinstance(datasets, str):
        datasets = [datasets]
    for key, value in (("base_model", base_model), ("datasets", datasets), ("language", language),
                       ("license", license)):
        if value is not None:
            setattr(data, key, value)
    wanted = ["early-exit", "hf_depthstop", config.model_type, f"stopping-rule-{config.stopping_rule}", *(tags or [])]
    kept = [tag for tag in (data.tags or []) if not tag.startswith("stopping-rule-")]  # the rule tag is regenerated
    data.tags = list(dict.fromkeys([*kept, *wanted]))
    return data


def write_model_card(
    model,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    tags: list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    description: str | None = None,
    measured: dict[str, list[dict]] | None = None,
) -> Path:
    """Write (or update) `save_directory/README.md` and the plot for `model` (a `DepthStop*` model or its config).

    Args:
        repo_id: the Hub id used in the usage snippet (`<repo_id>` when unknown).
        base_model, datasets, tags, language, license: card metadata; `None` keeps what the card has (tags are
            merged; `early-exit`, `hf_depthstop`, the model type and the rule are always there).
        model_name, description: title and first paragraph of a *new* card (an existing card keeps its own).
        measured: `{label: rows of hf_depthstop.compare_rules}`; default: from `depthstop_results.json` in the
            folder; when neither exists, an existing `measured` block is kept as it is.

    Returns:
        The path of README.md.
    """
    config = getattr(model, "config", model)
    if not hasattr(config, "exit_layers") or not hasattr(config, "stopping_rule"):
        raise TypeError(f"model must be a DepthStop* model or config (with exit_layers), got {type(model).__name__}")
    if repo_id is not None and (not isinstance(repo_id, str) or not repo_id.strip()):
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    if measured is not None and (
        not isinstance(measured, dict) or not all(isinstance(rows, list) for rows in measured.values())
    ):
        raise ValueError(f"measured must be a dict of label -> list of rule rows, got {type(measured).__name__}")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    readme = folder / "README.md"
    measured = measured if measured is not None else load_measured(folder)
    plotted = plot_accuracy_vs_compute(config, folder / PLOT_FILENAME, measured)
    blocks = {
        "usage": usage_markdown(config, repo_id),
        "exits": exits_markdown(config),
        "calibration": calibration_markdown(config, plotted),
        "measured": measured_markdown(measured) if measured else None,
    }

    existing = ModelCard.load(readme, ignore_metadata_errors=True) if readme.is_file() else None
    data = _card_data(existing.data if existing else None, config, base_model, datasets, tags, language, license)
    if existing is None:
        if repo_id is None and not model_name:
            model_name = folder.resolve().name
        title = model_name or repo_id.split("/")[-1]
        architecture = (config.architectures or [config.model_type])[0]
        if hasattr(model, "config"):
            architecture = type(model).__name__
        intro = description or (
            f"An early-exit model ({architecture}, made with `hf_depthstop`): exit heads after layers "
            f"{list(config.exit_layers)} and a stopping rule that decides, per example, how many layers to run."
        )
        card = ModelCard.from_template(
            data, template_path=str(TEMPLATE_PATH), model_name=title, description=intro,
            **{name: body or "No measurements yet." for name, body in blocks.items() if name != "measured"},
        )
        text = card.text
        if blocks["measured"]:
            text = _block_pattern("calibration").sub(
                lambda m: m.group(0) + "\n\n" + _block("measured", blocks["measured"]), text, count=1
            )
    else:
        text = existing.text
        for name, body in blocks.items():
            pattern = _block_pattern(name)
            if pattern.search(text):
                if body is not None:  # no new data for a block: keep what it had
                    text = pattern.sub(lambda m, b=body, n=name: _block(n, b), text, count=1)
            elif body is not None:
                text = text.rstrip("\n") + f"\n\n## {BLOCKS[name]}\n\n{_block(name, body)}\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text if text.startswith(chr(10)) else chr(10) + text}")
    card.save(readme)
    return readme


__all__ = ["PLOT_FILENAME", "load_measured", "plot_accuracy_vs_compute", "write_model_card"]
