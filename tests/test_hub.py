# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Hub sharing: flat remote code + auto_map, push/load through the real huggingface_hub client against the
project's own Hub server (tests/hub_server.py) on 127.0.0.1, failures (server down, HTTP 500, HTTP 401) and retries.

The client always runs in a fresh subprocess, whose environment points it at the local server (`HF_ENDPOINT`,
`HF_TOKEN`, a temporary `HF_HOME`, `HF_HUB_DISABLE_XET=1`, `HF_HUB_OFFLINE=0`): huggingface_hub and transformers read
those at import time, so this overrides tests/conftest.py's offline mode without patching any library function.
Loading "without the package" runs Python isolated (`-I`) with a meta-path finder that refuses `hf_depthstop`; the
script checks that the import fails and that no `hf_depthstop` module got loaded.
"""

import ast
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_depthstop import DepthStopBertForSequenceClassification, calibrate
from hf_depthstop.hub import (
    HubPushError,
    auto_class_names,
    flatten_relative_imports,
    remote_code_sources,
    upload_saved_folder,
    write_remote_code,
)
from tests.hub_server import DEFAULT_TOKEN, HubServer
from tests.testing_utils import pad_collator, tiny_bert_config, tiny_task, train_tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODULES = {"stopping.py", "losses.py", "modeling_outputs.py", "flops.py"}

HIDE_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class _HideHfDepthstop(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_depthstop" or name.startswith("hf_depthstop."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None

    sys.meta_path.insert(0, _HideHfDepthstop())
    try:
        import hf_depthstop  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_depthstop is still importable")
    """
)
ASSERT_STILL_HIDDEN = textwrap.dedent(
    """
    assert not [m for m in sys.modules if m.split(".")[0] == "hf_depthstop"], "hf_depthstop was loaded"
    """
)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def client_env(hub: HubServer, home: Path, token: str = DEFAULT_TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_client(code: str, env: dict, hidden: bool = False, timeout: int = 300) -> str:
    """Run `code` in a fresh Python; `hidden=True`: isolated mode and hf_depthstop made unimportable. The client uses
    this process' torch thread count, so float reductions run in the same order and outputs can match bit for bit."""
    code = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n" + code
    cmd = [sys.executable, "-c", code]
    if hidden:
        cmd = [sys.executable, "-I", "-c", HIDE_PACKAGE + code + ASSERT_STILL_HIDDEN]
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"client failed\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-8000:]}"
    return result.stdout


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def relative_imports(source: str) -> list[tuple[int, str | None, list[str]]]:
    return [
        (node.level, node.module, [a.name for a in node.names])
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]


def _walk_with_try(node, in_try=False):
    for child in ast.iter_child_nodes(node):
        yield child, in_try
        yield from _walk_with_try(child, in_try or isinstance(child, ast.Try))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained, calibrated early-exit BERT saved locally, with reference outputs on fixed inputs."""
    root = tmp_path_factory.mktemp("hub_model")
    model, _ = train_tiny_model(str(root / "train"), steps=15)
    calibrate(model, tiny_task(256, seed=1), rule="confidence")
    model.eval()
    batch = pad_collator([tiny_task(24, seed=2)[i] for i in range(24)])
    batch.pop("labels")
    for threshold in [i / 100 for i in range(34, 100)]:  # a setting where the batch exits at several layers
        model.set_stopping_rule("confidence", threshold=threshold)
        with torch.no_grad():
            out = model(**batch)
        if len(set(out.exit_layer.tolist())) > 2:
            break
    reference = {**batch, "logits": out.logits, "exit_layer": out.exit_layer, "compute_fraction": out.compute_fraction}
    torch.save(reference, root / "reference.pt")
    local = root / "local"
    model.save_pretrained(local)
    return types.SimpleNamespace(model=model, root=root, local=local, reference=root / "reference.pt", out=out)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


COMPARE = """
ref = torch.load({reference!r})
inputs = {{k: ref[k] for k in ("input_ids", "attention_mask")}}
model.eval()
with torch.no_grad():
    out = model(**inputs)
assert torch.equal(out.logits, ref["logits"]), (out.logits - ref["logits"]).abs().max()
assert torch.equal(out.exit_layer, ref["exit_layer"]), (out.exit_layer, ref["exit_layer"])
assert torch.equal(out.compute_fraction, ref["compute_fraction"])
print("IDENTICAL", type(model).__module__, model.config.stopping_rule, sorted(set(out.exit_layer.tolist())))
"""


# --------------------------------------------------------------------------------------------------------------
# the exporter (no network)
# --------------------------------------------------------------------------------------------------------------
def test_remote_code_is_flat_and_self_contained(trained):
    files = {p.name for p in trained.local.glob("*.py")}
    assert {"configuration_depthstop_bert.py", "modeling_depthstop_bert.py"} | SHARED_MODULES <= files
    for name in files:
        source = (trained.local / name).read_text()
        for level, module, names in relative_imports(source):
            assert level == 1, (name, module)
            targets = [module] if module else names
            assert all(f"{t}.py" in files for t in targets), (name, module, names)
        for node, in_try in _walk_with_try(ast.parse(source)):  # what transformers' check_imports would demand
            if isinstance(node, ast.Import) and not in_try:
                assert not any(a.name.split(".")[0] == "hf_depthstop" for a in node.names), (name, node.lineno)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and not in_try:
                assert (node.module or "").split(".")[0] != "hf_depthstop", (name, node.lineno)
    config = json.loads((trained.local / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_depthstop_bert.DepthStopBertConfig",
        "AutoModelForSequenceClassification": "modeling_depthstop_bert.DepthStopBertForSequenceClassification",
    }
    assert config["stopping_rule"] == "confidence" and config["calibration"]["table"]
    assert (trained.local / "README.md").is_file() and (trained.local / "depthstop_accuracy_vs_compute.png").is_file()


def test_flatten_relative_imports_rewrites_only_the_import_paths():
    source = (
        "import torch\n"
        "from ...stopping import (\n    build_rule,\n    observe,\n)\n"
        "from .. import losses\n"
        "def f():\n    from ...flops import transformer_layer_flops  # lazy\n    return 1\n"
    )
    flat = flatten_relative_imports(source, "hf_depthstop.models.bert.modeling_x")
    assert flat == (
        "import torch\n"
        "from .stopping import (\n    build_rule,\n    observe,\n)\n"
        "from . import losses\n"
        "def f():\n    from .flops import transformer_layer_flops  # lazy\n    return 1\n"
    )


def test_exporter_rejects_what_cannot_be_bundled(tmp_path):
    with pytest.raises(ValueError, match="imports the package 'hf_depthstop.models'"):
        flatten_relative_imports("from ...models import bert\n", "hf_depthstop.models.bert.modeling_x")
    with pytest.raises(ValueError, match="import hf_depthstop.stopping` outside a try block"):
        flatten_relative_imports("def f():\n    import hf_depthstop.stopping\n", "hf_depthstop.models.bert.modeling_x")
    guarded = "try:\n    import hf_depthstop\nexcept ImportError:\n    pass\n"
    assert flatten_relative_imports(guarded, "hf_depthstop.models.bert.modeling_x") == guarded
    main_class = type("Local", (DepthStopBertForSequenceClassification,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match="defined in __main__"):
        remote_code_sources(main_class)
    unregistered = type("Unregistered", (DepthStopBertForSequenceClassification,), {})
    with pytest.raises(ValueError, match="Unregistered is not registered with any transformers Auto class"):
        auto_class_names(unregistered)
    with pytest.raises(TypeError, match="model must be a PreTrainedModel"):
        write_remote_code(object(), tmp_path)
    with pytest.raises(TypeError, match="model_class must be a class"):
        remote_code_sources("DepthStopBertForSequenceClassification")


def test_upload_rejects_bad_arguments_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="repo_id must be 'name' or 'owner/name', got 'a/b/c'"):
        upload_saved_folder(tmp_path, "a/b/c")
    with pytest.raises(ValueError, match="repo_id must be 'name' or 'owner/name', got ''"):
        upload_saved_folder(tmp_path, "")
    with pytest.raises(ValueError, match="folder must be an existing directory"):
        upload_saved_folder(tmp_path / "missing", "me/x")
    with pytest.raises(ValueError, match="repo_id must be a non-empty string"):
        DepthStopBertForSequenceClassification(tiny_bert_config()).push_to_hub("")


def test_registered_classes_load_without_trust_remote_code(trained):
    """With the package imported, the config's auto_map does not force remote code: the registered class loads."""
    loaded = AutoModelForSequenceClassification.from_pretrained(trained.local).eval()
    assert type(loaded) is DepthStopBertForSequenceClassification
    ref = torch.load(trained.reference)
    with torch.no_grad():
        out = loaded(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"])
    assert torch.equal(out.logits, ref["logits"]) and torch.equal(out.exit_layer, ref["exit_layer"])
    assert len(set(ref["exit_layer"].tolist())) > 1, "the reference batch should exit at several layers"


def test_hub_push_error_message_names_repo_cause_and_folder():
    error = HubPushError("me/model", "http://127.0.0.1:1", ConnectionRefusedError("refused"), "/tmp/x")
    assert str(error) == (
        "Pushing to the Hub repo 'me/model' at http://127.0.0.1:1 failed: could not reach the Hub "
        "(ConnectionRefusedError: refused). The local save in /tmp/x is intact; push again to retry."
    )
    error = HubPushError("me/model", "http://h", KeyError("x"), None)
    assert "failed: KeyError: 'x'. Nothing was kept locally" in str(error)


# --------------------------------------------------------------------------------------------------------------
# push and load through the real client
# --------------------------------------------------------------------------------------------------------------
def test_push_then_load_with_and_without_the_package(trained, hub, tmp_path):
    env = client_env(hub, tmp_path / "hf_home")
    out = run_client(
        textwrap.dedent(f"""
        import torch
        import hf_depthstop
        from transformers import AutoModelForSequenceClassification
        from hf_depthstop import DepthStopBertForSequenceClassification

        model = DepthStopBertForSequenceClassification.from_pretrained({str(trained.local)!r})
        info = model.push_to_hub("tester/tiny-depthstop", model_card={{"datasets": ["tiny-task"]}}, tags=["demo"])
        print("PUSHED", info.oid)
        model = AutoModelForSequenceClassification.from_pretrained("tester/tiny-depthstop")
        assert type(model) is DepthStopBertForSequenceClassification, type(model)
        """)
        + COMPARE.format(reference=str(trained.reference)),
        env,
    )
    assert "IDENTICAL hf_depthstop.models.bert.modeling_depthstop_bert confidence" in out
    repo = hub.repos["tester/tiny-depthstop"]
    assert {"config.json", "model.safetensors", "README.md", "depthstop_accuracy_vs_compute.png"} <= set(repo.files)
    assert {"configuration_depthstop_bert.py", "modeling_depthstop_bert.py"} | SHARED_MODULES <= set(repo.files)
    assert repo.files["model.safetensors"]["lfs"] and repo.files["depthstop_accuracy_vs_compute.png"]["lfs"]
    config = json.loads(hub.file("tester/tiny-depthstop", "config.json"))
    assert config["stopping_rule"] == "confidence" and config["calibration"] == trained.model.config.calibration
    card = hub.file("tester/tiny-depthstop", "README.md").decode()
    assert "- early-exit" in card and "- tiny-task" in card and "- demo" in card
    assert 'from_pretrained("tester/tiny-depthstop", trust_remote_code=True)' in card

    # plain transformers, hf_depthstop hidden: needs trust_remote_code, then gives the same outputs and exits
    out = run_client(
        textwrap.dedent("""
        import torch
        from transformers import AutoModelForSequenceClassification
        try:
            AutoModelForSequenceClassification.from_pretrained("tester/tiny-depthstop")
        except ValueError as err:
            assert "trust_remote_code" in str(err), err
        else:
            raise SystemExit("loaded custom code without trust_remote_code")
        model = AutoModelForSequenceClassification.from_pretrained("tester/tiny-depthstop", trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        """)
        + COMPARE.format(reference=str(trained.reference)),
        env,
        hidden=True,
    )
    assert "IDENTICAL transformers_modules." in out and "confidence" in out


def test_failed_pushes_leave_the_local_save_and_a_retry_succeeds(trained, hub, tmp_path):
    """HTTP 500 on the commit, a refused token (401), and the server down: each raises HubPushError naming the repo
    and the cause, the local folder is unchanged, and pushing again succeeds."""
    save = tmp_path / "save"
    hub.fail(r"/commit/", status=500, times=1)
    code = f"""
        import hashlib, os, sys
        from pathlib import Path
        from hf_depthstop import DepthStopBertForSequenceClassification
        from hf_depthstop.hub import HubPushError, upload_saved_folder

        save = Path({str(save)!r})
        model = DepthStopBertForSequenceClassification.from_pretrained({str(trained.local)!r})

        def digest():
            return {{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in save.iterdir()}}

        def expect_failure(cause, **kwargs):
            try:
                upload_saved_folder(save, "tester/retry", **kwargs)
            except HubPushError as err:
                message = str(err)
                assert "'tester/retry'" in message and cause in message and str(save) in message, message
                print("FAILED:", message)
            else:
                raise SystemExit("the push did not fail")

        # 1. HTTP 500 on the commit, through save_pretrained(push_to_hub=True): saved first, then the upload fails
        try:
            model.save_pretrained(save, push_to_hub=True, repo_id="tester/retry")
        except HubPushError as err:
            assert "HTTP 500" in str(err) and "'tester/retry'" in str(err) and "intact" in str(err), err
            print("FAILED:", err)
        else:
            raise SystemExit("the push did not fail")
        before = digest()
        assert {{"config.json", "model.safetensors", "README.md", "modeling_depthstop_bert.py"}} <= set(before)
        upload_saved_folder(save, "tester/retry")
        print("RETRY-OK 500")

        # 2. a refused token (HTTP 401); the retry uses the valid HF_TOKEN
        expect_failure("authentication failed (HTTP 401)", token="hf_not_a_valid_token")
        assert digest() == before
        upload_saved_folder(save, "tester/retry", commit_message="after 401")
        print("RETRY-OK 401")

        # 3. the server is down (the parent stops it, then restarts it on the same port)
        print("PAUSE", flush=True)
        sys.stdin.readline()
        expect_failure("could not reach the Hub")
        assert digest() == before
        print("RESUME", flush=True)
        sys.stdin.readline()
        model.push_to_hub("tester/retry", save_directory=save, commit_message="after the outage")
        print("RETRY-OK down")
        """
    env = client_env(hub, tmp_path / "hf_home")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PAUSE"):
                hub.pause()
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif line.startswith("RESUME"):
                hub.resume()
                proc.stdin.write("\n")
                proc.stdin.flush()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert proc.returncode == 0, f"{output}\nSTDERR:\n{proc.stderr.read()[-6000:]}\n{hub.requests}"
    assert output.count("FAILED:") == 3 and "RETRY-OK down" in output, output
    assert [c["title"] for c in hub.repos["tester/retry"].commits] == ["Upload early-exit model"]  # retries: no-ops
    hub_digest = {path: hashlib.sha256(f["data"]).hexdigest() for path, f in hub.repos["tester/retry"].files.items()}
    assert hub_digest == folder_digest(save)  # the Hub holds exactly the local save


def test_trainer_push_to_hub_uploads_the_early_exit_card(hub, tmp_path):
    env = client_env(hub, tmp_path / "hf_home")
    out = run_client(
        textwrap.dedent(f"""
        import torch
        from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments
        from hf_depthstop.hub import HubPushError
        from tests.testing_utils import pad_collator, tiny_bert_config, tiny_task

        torch.manual_seed(0)
        model = DepthStopBertForSequenceClassification(tiny_bert_config())
        args = DepthStopTrainingArguments(
            {str(tmp_path / "out")!r}, max_steps=3, per_device_train_batch_size=8, report_to="none", use_cpu=True,
            save_strategy="no", disable_tqdm=True, push_to_hub=True, hub_model_id="tester/trainer-run",
            hub_strategy="end",
        )
        trainer = DepthStopTrainer(model=model, args=args, train_dataset=tiny_task(32), data_collator=pad_collator)
        trainer.train()
        try:
            trainer.push_to_hub(token="hf_not_a_valid_token")
        except HubPushError as err:
            assert "authentication failed (HTTP 401)" in str(err) and "tester/trainer-run" in str(err), err
            print("FAILED 401")
        trainer.push_to_hub(dataset="tiny-task")
        print("PUSHED")
        """),
        env,
    )
    assert "FAILED 401" in out and "PUSHED" in out
    repo = hub.repos["tester/trainer-run"]
    expected = {"config.json", "model.safetensors", "README.md", "modeling_depthstop_bert.py", "stopping.py"}
    assert expected <= set(repo.files)
    card = hub.file("tester/trainer-run", "README.md").decode()
    assert "- early-exit" in card and "<!-- hf_depthstop:begin exits -->" in card and "- tiny-task" in card
    assert "auto_map" in json.loads(hub.file("tester/trainer-run", "config.json"))
    assert (tmp_path / "out" / "README.md").read_text() == card  # the local save is what was pushed


# --------------------------------------------------------------------------------------------------------------
# every other model class: the same exporter, loaded by plain transformers without the package
# --------------------------------------------------------------------------------------------------------------
def _other_models():
    """(name, model, inputs) for each DepthStop* class besides BERT, tiny and seeded."""
    import hf_depthstop
    from tests.testing_utils import tiny_vit_config

    specs = [
        ("vit", "DepthStopViTForImageClassification", lambda: tiny_vit_config(), {"pixel_values": (2, 1, 16, 16)}),
        ("resnet", "DepthStopResNetForImageClassification", lambda: hf_depthstop.DepthStopResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=3,
        ), {"pixel_values": (2, 3, 32, 32)}),
        ("llama", "DepthStopLlamaForCausalLM", lambda: hf_depthstop.DepthStopLlamaConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=97, pad_token_id=0, exit_adapter="affine", exit_vocab=list(range(0, 97, 3)),
        ), {"input_ids": (2, 8), "output_exit_logits": True}),
        ("gpt2", "DepthStopGPT2LMHeadModel", lambda: hf_depthstop.DepthStopGPT2Config(
            n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=97, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        ), {"input_ids": (2, 8), "output_exit_logits": True}),
    ]
    for name, class_name, make_config, shapes in specs:
        if not hasattr(hf_depthstop, class_name):
            continue
        torch.manual_seed(0)
        model = getattr(hf_depthstop, class_name)(make_config()).eval()
        with torch.no_grad():  # trained-looking exit adapters (zero when new)
            for p in getattr(model, "exit_adapters", None) or []:
                p.weight.normal_(0.0, 0.1)
        g = torch.Generator().manual_seed(1)
        inputs = {
            key: shape if isinstance(shape, bool)
            else torch.randint(3, 97, shape, generator=g) if key == "input_ids" else torch.randn(shape, generator=g)
            for key, shape in shapes.items()
        }
        yield name, model, inputs


def test_every_other_model_class_loads_from_its_remote_code_without_the_package(tmp_path):
    from hf_depthstop.hub import DepthStopHubMixin

    names = []
    for name, model, inputs in _other_models():
        folder = tmp_path / name
        if not isinstance(model, DepthStopHubMixin):  # the hook is not in this class' bases (yet): export directly
            write_remote_code(model, folder)
        model.save_pretrained(folder)
        auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
        with torch.no_grad():
            out = model(**inputs)
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        torch.save({"inputs": inputs, "outputs": tensors, "auto": [k for k in auto_map if k != "AutoConfig"][0]},
                   folder / "reference.pt")
        names.append(name)
    if not names:
        pytest.skip("no other DepthStop* model class exists yet")
    out = run_client(
        textwrap.dedent(f"""
        import torch, transformers
        for name in {names!r}:
            folder = {str(tmp_path)!r} + "/" + name
            ref = torch.load(folder + "/reference.pt")
            model = getattr(transformers, ref["auto"]).from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                out = model(**ref["inputs"])
            for key, value in ref["outputs"].items():
                assert torch.equal(out[key], value), (name, key)
            print("IDENTICAL", name, type(model).__name__, sorted(ref["outputs"]))
        """),
        client_env(HubServer(), tmp_path / "hf_home"),
        hidden=True,
    )
    assert out.count("IDENTICAL") == len(names), out


@pytest.mark.slow
def test_recipe_push_flags_upload_the_calibrated_model_and_its_card(hub, tmp_path):
    out_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "train_classifier.py"), "--config",
         str(REPO_ROOT / "recipes" / "configs" / "quickstart.yaml"), "--n_train", "64", "--n_val", "120",
         "--n_test", "60", "--max_steps", "2", "--eval_batch_sizes", "32", "--output_dir", str(out_dir),
         "--push_to_hub", "--hub_model_id", "tester/recipe-run"],
        env=client_env(hub, tmp_path / "hf_home"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Pushed " in result.stdout
    files = hub.repos["tester/recipe-run"].files
    assert {"config.json", "model.safetensors", "README.md", "depthstop_results.json", "tokenizer.json",
            "modeling_depthstop_bert.py", "stopping.py", "depthstop_accuracy_vs_compute.png"} <= set(files)
    config = json.loads(hub.file("tester/recipe-run", "config.json"))
    assert config["calibration"]["table"] and config["stopping_rule"] == "asti" and "auto_map" in config
    card = hub.file("tester/recipe-run", "README.md").decode()
    assert "**test split, batch 32**" in card and "- early-exit" in card
    assert card == (out_dir / "README.md").read_text()
