"""Every `kubectl apply -k PATH` that deploy/README.md (or README.md, docs/) tells a reader to
run renders with kustomize and validates strictly against the Kubernetes schemas.

The lines are read from the documents, so a command added there is tested without editing
this file, and a command naming a folder that does not render fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.test_manifests import K8S_VERSIONS, ROOT, kustomize, tool

#: `kubectl apply -k PATH` at the start of a line (a command, not a mention in prose).
APPLY = re.compile(r"^\s*(?:\$\s*)?kubectl\s+apply\s+-k\s+(\S+)", re.M)
DOCUMENTS = [ROOT / "deploy" / "README.md", ROOT / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]


def apply_lines() -> list[tuple[str, str]]:
    """(document, folder) of every `kubectl apply -k` command line in the documents."""
    found = []
    for document in DOCUMENTS:
        if document.exists():
            for match in APPLY.finditer(document.read_text(encoding="utf-8")):
                found.append((str(document.relative_to(ROOT)), match[1]))
    return found


def test_deploy_readme_has_apply_lines() -> None:
    """The parser still finds the commands (else the test below would check nothing)."""
    folders = {folder for document, folder in apply_lines()
               if document == "deploy/README.md"}
    assert {"deploy/overlays/gateway", "deploy/overlays/trial",
            "deploy/overlays/sidecar"} <= folders, folders


@pytest.mark.parametrize(("document", "folder"), apply_lines())
def test_every_apply_line_renders_and_validates(document: str, folder: str) -> None:
    path = ROOT / folder  # the commands are run from the repository's root
    assert (path / "kustomization.yaml").exists(), f"{document}: {folder} is no kustomization"
    rendered = kustomize(tool("kubectl", "kubectl 1.21 or newer"), path)
    assert rendered, f"{document}: {folder} renders nothing"
    problems = []
    for doc in rendered:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not problems, f"{document}: kubectl apply -k {folder}:\n" + "\n".join(problems)


def test_apply_line_parser() -> None:
    text = "kubectl apply -k deploy/overlays/x   # note\n`kubectl apply -k` in prose\n"
    assert APPLY.findall(text) == ["deploy/overlays/x"]
    assert Path("deploy/overlays/x").parts[0] == "deploy"
