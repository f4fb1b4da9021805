# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Sharing `DepthStop*` models on the Hub: self-contained remote code with `auto_map`, the model card, and pushes
that fail with a clear error.

[`DepthStopHubMixin`] (first base of every `DepthStop*` model) hooks `save_pretrained`: next to the weights and the
config (stopping rule and calibration included) it writes

- the model's configuration and modeling files **and the package modules they import** (`stopping`, `losses`,
  `modeling_outputs`, `flops`, ... found by following the relative imports), as a flat folder of `.py` files whose
  relative imports are rewritten to flat form (`from ...stopping import x` -> `from .stopping import x`);
- `config.auto_map` (`AutoConfig` and the model's Auto class), so plain `transformers` loads the model with
  `trust_remote_code=True` where `hf_depthstop` is not installed. With the package installed, the registered classes
  load it without `trust_remote_code` (transformers prefers registered local code);
- the model card `README.md` (see [`hf_depthstop.modelcard`]; hand-written prose is kept on re-save).

`push_to_hub` saves (to a temporary folder, or the folder given) and uploads the folder in one commit; any failure
raises [`HubPushError`] naming the repo, the endpoint, the cause and the local folder.

This module is itself bundled with the remote code (the models import the mixin), so it imports only the standard
library, `transformers` and `huggingface_hub`; the card renderer is used only where `hf_depthstop` is importable.
"""

import ast
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from transformers.utils import logging


logger = logging.get_logger(__name__)

_FROM_RELATIVE = re.compile(r"^(?P<head>\s*from\s+)(?P<module>\.+[\w.]*)(?P<tail>\s+import\b)")


class HubPushError(RuntimeError):
    """A push to the Hub failed. Attributes: `repo_id`, `endpoint`, `folder` (the local save, intact) and `cause`."""

    def __init__(self, repo_id: str, endpoint: str, cause: BaseException, folder: str | None = None):
        self.repo_id, self.endpoint, self.cause, self.folder = repo_id, endpoint, cause, folder
        where = (
            f"The local save in {folder} is intact; push again to retry."
            if folder
            else "Nothing was kept locally; save_pretrained(folder, push_to_hub=True, repo_id=...) keeps a copy."
        )
        cause_text = describe_hub_error(cause)
        super().__init__(f"Pushing to the Hub repo {repo_id!r} at {endpoint} failed: {cause_text}. {where}")


def describe_hub_error(exc: BaseException) -> str:
    """One line saying why a Hub request failed: authentication, server error, no connection, or the exception."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    server_message = getattr(exc, "server_message", None) or ""
    detail = f" ({server_message.strip()})" if server_message.strip() else ""
    if status in (401, 403):
        return (
            f"authentication failed (HTTP {status}){detail}: the token was refused; set HF_TOKEN or run "
            "`hf auth login` with a token that has write access"
        )
    if status is not None and status >= 500:
        return f"the Hub answered HTTP {status}, a server error{detail}"
    if status is not None:
        return f"the Hub answered HTTP {status}{detail}"
    name = type(exc).__name__
    if any(word in name for word in ("Connect", "Network", "Timeout", "Protocol")):
        return f"could not reach the Hub ({name}: {exc})"
    return f"{name}: {exc}"


# ----------------------------------------------------------------------------------------------------------------
# Remote code: which files, rewritten how, and the auto_map
# ----------------------------------------------------------------------------------------------------------------
def _module_file(module_name: str) -> str:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        spec = importlib.util.find_spec(module_name)
        path = spec.origin if spec is not None else None
    if path is None or not path.endswith(".py"):
        raise ValueError(f"cannot bundle module {module_name!r}: it has no .py source file (got {path!r})")
    return path


def _is_package(module_name: str) -> bool:
    module = sys.modules.get(module_name)
    if module is not None:
        return hasattr(module, "__path__")
    spec = importlib.util.find_spec(module_name)
    return spec is not None and spec.submodule_search_locations is not None


def _walk(node: ast.AST, in_try: bool = False):
    """(node, inside a `try:` block) for every node under `node`."""
    for child in ast.iter_child_nodes(node):
        yield child, in_try
        yield from _walk(child, in_try or isinstance(child, ast.Try))


def _relative_targets(source: str, module_name: str, filename: str) -> dict[int, list[str]]:
    """{line number (1-based) of a relative `from` import: absolute names of the modules it needs}.

    Like transformers' `check_imports`, every import statement counts (also inside functions), except absolute
    imports inside `try:` blocks; an absolute import of the package itself elsewhere is a `ValueError`, because the
    remote code would then need the package."""
    package = module_name.rpartition(".")[0]
    top = module_name.split(".")[0]
    targets: dict[int, list[str]] = {}
    for node, in_try in _walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if node.module is None:  # `from .. import stopping`: the names are modules
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                names = [base]
            for name in names:
                if _is_package(name):
                    raise ValueError(
                        f"cannot bundle {filename}:{node.lineno}: it imports the package {name!r}; import its modules "
                        "(e.g. `from ...stopping import x`) so the remote code can be a flat folder"
                    )
            targets[node.lineno] = names
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not in_try and top != "transformers_modules":
            absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in absolute:
                if name == top or name.startswith(top + "."):
                    raise ValueError(
                        f"cannot bundle {filename}:{node.lineno}: `import {name}` outside a try block makes the "
                        f"remote code require the {top} package; import its modules relatively "
                        "(`from .module import name`) or guard the import with try/except"
                    )
    return targets


def remote_code_sources(model_class: type, config_class: type | None = None) -> dict[str, tuple[str, str]]:
    """The files the remote code of `model_class` needs: `{flat file name: (module name, source path)}`.

    Starts from the modules defining the model class and its config class and follows relative imports
    (including those inside functions) transitively. Raises `ValueError` for a class defined in `__main__`, a package
    import, an absolute import of the package itself, or two modules with the same file name."""
    if not isinstance(model_class, type):
        raise TypeError(f"model_class must be a class, got {type(model_class).__name__}")
    config_class = config_class or getattr(model_class, "config_class", None)
    roots = [model_class.__module__] + ([config_class.__module__] if config_class is not None else [])
    if "__main__" in roots:
        raise ValueError(f"cannot bundle {model_class.__name__}: it is defined in __main__, not in a module file")
    found: dict[str, tuple[str, str]] = {}
    queue = list(dict.fromkeys(roots))
    while queue:
        name = queue.pop(0)
        path = _module_file(name)
        flat = name.rpartition(".")[2] + ".py"
        if flat in found:
            if found[flat][0] != name:
                raise ValueError(f"cannot bundle both {found[flat][0]!r} and {name!r}: both would be {flat}")
            continue
        found[flat] = (name, path)
        source = Path(path).read_text(encoding="utf-8")
        for names in _relative_targets(source, name, path).values():
            queue.extend(n for n in names if n not in queue)
    return found


def flatten_relative_imports(source: str, module_name: str, filename: str = "<source>") -> str:
    """`source` with every relative `from` import pointing at a sibling file: `from ...stopping import x` ->
    `from .stopping import x`, `from .. import stopping` -> `from . import stopping`. Nothing else changes."""
    targets = _relative_targets(source, module_name, filename)
    lines = source.splitlines(keepends=True)
    for lineno, names in targets.items():
        line = lines[lineno - 1]
        match = _FROM_RELATIVE.match(line)
        if match is None:
            raise ValueError(f"cannot rewrite the relative import at {filename}:{lineno}: {line.strip()!r}")
        written = match.group("module").lstrip(".")
        flat = "." + (names[0].rpartition(".")[2] if written else "")
        lines[lineno - 1] = line[: match.start("module")] + flat + line[match.end("module") :]
    return "".join(lines)


def auto_class_names(model_class: type, config=None) -> list[str]:
    """The `transformers` Auto classes `model_class` is registered with (e.g. `AutoModelForSequenceClassification`).

    Without a registration (remote code loaded without the package), the entries of `config.auto_map` that name the
    class. `ValueError` if there are none."""
    from transformers.models.auto import modeling_auto

    names = []
    config_class = getattr(model_class, "config_class", None)
    for name in sorted(dir(modeling_auto)):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        if not name.startswith("AutoModel") or mapping is None or config_class is None:
            continue
        try:
            if mapping[config_class] is model_class:
                names.append(name)
        except (KeyError, ValueError):
            continue
    if not names and config is not None:
        auto_map = getattr(config, "auto_map", None) or {}
        names = [k for k, v in auto_map.items() if k != "AutoConfig" and str(v).endswith(f".{model_class.__name__}")]
    if not names:
        raise ValueError(
            f"{model_class.__name__} is not registered with any transformers Auto class; register it, e.g. "
            f"AutoModelForSequenceClassification.register({getattr(config_class, '__name__', None)}, "
            f"{model_class.__name__})"
        )
    return names


def auto_map_for(model) -> dict[str, str]:
    """The `config.auto_map` of `model`'s remote code: `{"AutoConfig": "configuration_x.XConfig", <Auto class>:
    "modeling_x.XModel"}`."""
    model_class, config_class = type(model), type(model.config)
    auto_map = {"AutoConfig": f"{config_class.__module__.rpartition('.')[2]}.{config_class.__name__}"}
    for name in auto_class_names(model_class, model.config):
        auto_map[name] = f"{model_class.__module__.rpartition('.')[2]}.{model_class.__name__}"
    return auto_map


def write_remote_code(model, save_directory: str | os.PathLike) -> list[str]:
    """Write `model`'s flat, self-contained remote code into `save_directory` and set `model.config.auto_map`
    (save the config afterwards, or call this before `save_pretrained`). Returns the written file names."""
    if not hasattr(model, "config"):
        raise TypeError(f"model must be a PreTrainedModel with a config, got {type(model).__name__}")
    sources = remote_code_sources(type(model), type(model.config))
    model.config.auto_map = auto_map_for(model)
    os.makedirs(save_directory, exist_ok=True)
    for flat, (module_name, path) in sources.items():
        text = flatten_relative_imports(Path(path).read_text(encoding="utf-8"), module_name, path)
        Path(save_directory, flat).write_text(text, encoding="utf-8")
    return sorted(sources)


# ----------------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------------
def upload_saved_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    keep_local: bool = True,
):
    """Create `repo_id` if needed and upload `folder` in one commit (unchanged files are skipped by the Hub).
    Returns the `CommitInfo`. Any failure raises [`HubPushError`]; `folder` is never modified."""
    if not isinstance(repo_id, str) or not repo_id.strip() or repo_id.count("/") > 1:
        raise ValueError(f"repo_id must be 'name' or 'owner/name', got {repo_id!r}")
    if not os.path.isdir(folder):
        raise ValueError(f"folder must be an existing directory, got {str(folder)!r}")
    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint, library_name="hf_depthstop")
    try:
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload early-exit model",
            commit_description=commit_description, token=token, revision=revision, create_pr=create_pr,
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*", "_*"],
        )
    except Exception as exc:  # any failure of the network part becomes one clear error; the folder is untouched
        raise HubPushError(repo_id, endpoint, exc, str(folder) if keep_local else None) from exc


def fetch_hub_card(repo_id: str, token: str | bool | None = None, revision: str | None = None) -> str | None:
    """The text of `repo_id`'s README.md on the Hub, or `None` if the repo or the file does not exist."""
    try:
        return Path(hf_hub_download(repo_id, "README.md", token=token, revision=revision)).read_text(encoding="utf-8")
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None
    except HfHubHTTPError as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 404:
            return None
        raise


def _card_module():
    try:
        return importlib.import_module("hf_depthstop.modelcard")
    except ImportError:  # remote code where the package is not installed: code and config only
        return None


class DepthStopHubMixin:
    """Put first in the bases of a `DepthStop*` `PreTrainedModel`: `save_pretrained` also writes the flat remote code,
    `config.auto_map` and the model card, and `push_to_hub` uploads all of it (errors: [`HubPushError`])."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        *,
        model_card: dict | None = None,
        **kwargs,
    ):
        """[`PreTrainedModel.save_pretrained`] plus the remote code, `auto_map` and the card (`model_card`: keyword
        arguments of [`hf_depthstop.modelcard.write_model_card`], e.g. `{"datasets": ["x"], "base_model": "y"}`).

        With `push_to_hub=True` (`repo_id=`, `commit_message=`, `private=`, `create_pr=`, `token=` as in
        transformers) the folder is saved completely first, then uploaded; a failed upload raises
        [`HubPushError`] and leaves the folder as saved."""
        hub_keys = ("repo_id", "commit_message", "private", "create_pr")
        hub_kwargs = {key: kwargs.pop(key) for key in hub_keys if key in kwargs}
        token = kwargs.get("token")
        adapters_only = getattr(self, "_hf_peft_config_loaded", False)
        writes = self.should_save_on_this_rank(is_main_process) and not adapters_only
        if writes:
            self.config.auto_map = auto_map_for(self)  # before the config is written
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
        if not writes:
            return
        write_remote_code(self, save_directory)
        cards = _card_module()
        if cards is not None:
            card_kwargs = {"repo_id": hub_kwargs.get("repo_id"), **(model_card or {})}
            cards.write_model_card(self, save_directory, **card_kwargs)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            upload_saved_folder(save_directory, repo_id, token=token, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        model_card: dict | None = None,
        save_directory: str | os.PathLike | None = None,
    ):
        """Save and upload the model: weights, config (rule, calibration, `auto_map`), remote code and card.

        The card starts from the repo's current README.md (its prose is kept) unless `save_directory` already
        holds one. `save_directory` (*optional*) keeps the saved folder; by default a temporary folder is used.
        `tags` are added to the card. Returns the `CommitInfo`; failures raise [`HubPushError`]."""
        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
        card = dict(model_card or {})
        if tags:
            card["tags"] = [*card.get("tags", []), *([tags] if isinstance(tags, str) else tags)]
        temporary = save_directory is None
        folder = tempfile.mkdtemp(prefix="depthstop_push_") if temporary else os.fspath(save_directory)
        try:
            if not os.path.exists(os.path.join(folder, "README.md")):
                try:
                    existing = fetch_hub_card(repo_id, token=token, revision=revision)
                except Exception as exc:
                    raise HubPushError(repo_id, constants.ENDPOINT, exc, None if temporary else folder) from exc
                if existing is not None:
                    os.makedirs(folder, exist_ok=True)
                    Path(folder, "README.md").write_text(existing, encoding="utf-8")
            self.save_pretrained(folder, max_shard_size=max_shard_size, model_card={**card, "repo_id": repo_id})
            return upload_saved_folder(
                folder, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
                commit_description=commit_description, create_pr=create_pr, keep_local=not temporary,
            )
        finally:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)


__all__ = [
    "DepthStopHubMixin",
    "HubPushError",
    "auto_map_for",
    "flatten_relative_imports",
    "remote_code_sources",
    "upload_saved_folder",
    "write_remote_code",
]
