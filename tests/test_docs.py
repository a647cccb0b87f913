"""The docs hold: README.md and docs/*.md.

(a) every relative link and image resolves, and every `#anchor` names a heading (GitHub's slugs) or an
    `<a id>` of the page it points into;
(b) every shell command in their fenced bash blocks is checked: `python -m MODULE ...` parses with that
    module's own argparse parser (its `build_parser()`), `make TARGET` names a Makefile target, and every
    other command is in ALLOWED with the reason it is not run here;
(c) the README's first client call (the CLI and the Python block), the liveness command and the
    wire contract's perf_analyzer data script run for real, against the session's tritonserver.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.outputs import structure_colors
from wholebody.triton_server import LocalTritonServer

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)

# Commands of the docs that this test does not run or parse, by (page, program): why.
ALLOWED: dict[tuple[str, str], str] = {
    ("README.md", "."): "sources the virtualenv `make setup` creates (a shell builtin)",
    ("docs/development.md", "python -"): "an inline script over the demo's output: the picture's recipe; "
                                         "write_preview is tested in tests/test_clinical_preview.py",
    ("docs/gpu-serving.md", "docker"): "needs a Docker daemon and a GPU: none on the machines this was built on",
    ("docs/gpu-serving.md", "pip"): "installs into NVIDIA's container; tests/test_client_install.py installs the "
                                    "package into a fresh virtualenv",
    ("docs/operations.md", "docker"): "builds and pushes the images: no Docker daemon here (the Dockerfiles are "
                                      "linted by tests/test_deploy.py)",
    ("docs/operations.md", "kubectl"): "acts on a live cluster: none here (the overlays are rendered by a real "
                                       "kubectl and validated offline in tests/test_deploy.py)",
    ("docs/operations.md", "base64"): "decodes the Secret read from a live cluster",
    ("docs/operations.md", "curl"): "a keyed reload through a port-forward to a pod of a live cluster; the keyed "
                                    "reload itself is tested in tests/test_hardening.py",
    ("docs/security.md", "curl"): "needs the operator key file of a running server (/run/secrets/...); keyed "
                                  "and refused loads are tested in tests/test_hardening.py",
    ("docs/security.md", "python -"): "the same keyed reload by gRPC, with the key file of a running server; "
                                      "operator_headers is what tests/test_hardening.py reloads with",
    ("docs/hospital-flow.md", "storescu"): "a modality's push; tests/test_router.py pushes with the real storescu",
    ("docs/hospital-flow.md", "kubectl"): "acts on a live cluster: none here (the router example overlay is "
                                          "rendered by a real kubectl and validated offline in tests/test_router.py)",
    ("docs/wire-contract.md", "="): "shell variables of the curl example, run by tests/test_client.py",
    ("docs/wire-contract.md", "printf"): "part of the curl example, run by tests/test_client.py",
    ("docs/wire-contract.md", "cat"): "part of the curl example, run by tests/test_client.py",
    ("docs/wire-contract.md", "curl"): "the curl example, run against the real server by tests/test_client.py",
    ("docs/wire-contract.md", "mkdir"): "part of the perf_analyzer data script, run below "
                                        "(test_wire_contract_perf_analyzer_data_script)",
    ("docs/wire-contract.md", "python -"): "the perf_analyzer data script, run below "
                                           "(test_wire_contract_perf_analyzer_data_script)",
    ("docs/wire-contract.md", "perf_analyzer"): "takes the options the script prints (a placeholder in the "
                                                "docs); perf_analyzer runs for real in tests/test_perf.py",
}
CONTROL = {"&&", "||", "|", ";", "&"}
REDIRECTS = {">", ">>", "<", "<<", "2>", "2>&1"}
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


def rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def outside_fences(text: str) -> str:
    """The Markdown text with its fenced blocks blanked (a `# comment` in a block is not a heading)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def outside_code(text: str) -> str:
    """The Markdown text with fenced blocks and inline code blanked (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "``", outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but `-` and `_` removed,
    spaces to `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a link may name in `page`: its headings' slugs (GitHub numbers repeats -1, -2, ...)
    and its `<a id=...>` / `<a name=...>` marks."""
    text = outside_fences(page.read_text())
    found: set[str] = set()
    seen: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def links(page: Path) -> Iterator[str]:
    """The targets of the page's Markdown links and images, and of HTML href/src attributes."""
    text = outside_code(page.read_text())
    yield from re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    yield from re.findall(r"(?:href|src)=\"([^\"]+)\"", text)


def test_pages_exist_and_readme_keeps_the_two_commands() -> None:
    assert len(PAGES) > 1, "docs/*.md missing"
    readme = README.read_text()
    blocks = [body for language, body in FENCE.findall(readme) if language in SHELL_LANGUAGES]
    first = blocks[0].splitlines()
    assert first[0].startswith("make demo ") and first[1].startswith("make test "), first


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target}: no such file {resolved}")
            continue
        if anchor:
            if resolved.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(resolved):
                broken.append(f"{target}: no heading or <a id> '{anchor}' in {rel(resolved)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


# --- (b) the commands -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    page: str
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        """What ALLOWED keys on: `python -m` modules by module, `python -` as such, else the first word;
        a pure assignment is `=`."""
        if not self.argv:
            return "="
        if self.argv[0] == "python" and len(self.argv) > 1 and self.argv[1] == "-":
            return "python -"
        return self.argv[0]


def logical_lines(block: str) -> Iterator[str]:
    """The block's lines with backslash continuations joined and here-document bodies left out."""
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        i += 1
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        yield line


def split_commands(page: str, line: str) -> Iterator[Command]:
    """The simple commands of one logical line: comments dropped, split at control operators, redirections
    and leading assignments left out (`NAME=$(cmd ...` counts as `cmd ...`; assignments alone: argv ())."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    for token in [*lexer, ";"]:
        if token not in CONTROL:
            words.append(token)
            continue
        if words:
            yield Command(page, tuple(without_redirections(without_assignments(words))))
        words = []


def without_assignments(words: list[str]) -> list[str]:
    words = list(words)
    while words and ASSIGNMENT.match(words[0]) and "$(" not in words[0]:
        words.pop(0)
    if words and ASSIGNMENT.match(words[0]):
        words[0] = words[0].split("$(", 1)[1]
    return words


def without_redirections(words: list[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTS:
            skip = True
        else:
            kept.append(word)
    return kept


def shell_commands() -> list[Command]:
    """Every command of every fenced bash block of the README and docs/."""
    found: list[Command] = []
    for page in PAGES:
        for language, body in FENCE.findall(page.read_text()):
            if language in SHELL_LANGUAGES:
                for line in logical_lines(body):
                    found += split_commands(rel(page), line)
    return found


COMMANDS = shell_commands()


def makefile_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M)}


def module_parser(module: str) -> argparse.ArgumentParser:
    """The module's own parser: `build_parser()` of the module or of its `__main__`."""
    for name in (module, f"{module}.__main__"):
        try:
            loaded = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        if hasattr(loaded, "build_parser"):
            return loaded.build_parser()
    raise AssertionError(f"python -m {module}: no build_parser() in {module} or {module}.__main__: add one")


def test_commands_were_found() -> None:
    programs = {c.program for c in COMMANDS}
    assert {"make", "python", "docker", "kubectl", "curl"} <= programs, programs
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c.argv[:2] == ("python", "-m")], ids=lambda c: " ".join(c.argv)[:80]
)
def test_python_module_commands_parse(command: Command) -> None:
    module, args = command.argv[2], list(command.argv[3:])
    parser = module_parser(module)
    if "--help" in args or "-h" in args:
        with pytest.raises(SystemExit) as done:
            parser.parse_args(args)
        assert done.value.code == 0
        return
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{command.page}: `{shlex.join(command.argv)}` does not parse (exit {exc.code})")


def test_make_commands_name_real_targets() -> None:
    targets = makefile_targets()
    makes = [c for c in COMMANDS if c.program == "make"]
    assert makes
    for command in makes:
        named = [word for word in command.argv[1:] if not word.startswith("-") and "=" not in word]
        assert named and set(named) <= targets, f"{command.page}: `{shlex.join(command.argv)}`: targets {targets}"


def test_every_other_command_is_allowed_with_a_reason() -> None:
    others = [c for c in COMMANDS if c.program != "make" and c.argv[:2] != ("python", "-m")]
    unlisted = sorted({f"{c.page}: {shlex.join(c.argv) or '(assignment)'}" for c in others
                       if (c.page, c.program) not in ALLOWED})
    assert not unlisted, "commands neither parsed nor allowed (add them to ALLOWED with a reason):\n" + "\n".join(
        unlisted)
    stale = set(ALLOWED) - {(c.page, c.program) for c in others}
    assert not stale, f"ALLOWED entries no command uses any more: {sorted(stale)}"


# --- (c) run for real -----------------------------------------------------------------------------------
def block_after(page: Path, marker: str) -> str:
    text = page.read_text()
    return FENCE.search(text, text.index(f"<!-- {marker} -->")).group(2)  # type: ignore[union-attr]


def readme_command(prefix: str) -> list[str]:
    """The README's command starting with `prefix`, as argv."""
    matches = [c.argv for c in COMMANDS if c.page == "README.md" and shlex.join(c.argv).startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    return list(matches[0])


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, **kwargs)  # type: ignore[call-overload]


def test_readme_first_client_call_cli(server: LocalTritonServer, example_ct: Path, tmp_path: Path) -> None:
    argv = readme_command("python -m client .cache/ct/example_ct.nii.gz")
    argv = [str(example_ct) if word == ".cache/ct/example_ct.nii.gz" else word for word in argv]
    argv = [str(tmp_path / "output") if word == "output" else word for word in argv]
    done = run([*argv, "-u", server.grpc_url])
    assert done.returncode == 0, done.stdout + done.stderr
    labels = nib.load(tmp_path / "output" / "example_ct_seg.nii.gz")
    assert labels.shape == nib.load(example_ct).shape
    assert (tmp_path / "output" / "example_ct_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_first_client_call_python(server: LocalTritonServer, example_ct: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = block_after(README, "first-call-python")
    assert '".cache/ct/example_ct.nii.gz"' in code and '"localhost:8001"' in code
    code = code.replace('".cache/ct/example_ct.nii.gz"', repr(str(example_ct)))
    code = code.replace('"localhost:8001"', repr(server.grpc_url))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md first-call-python", "exec"), namespace)  # noqa: S102
    labels = namespace["labels"]
    assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8
    assert labels.shape == nib.load(example_ct).shape
    assert len(namespace["names"]) == len(structure_colors()) == 105  # type: ignore[arg-type]
    assert capsys.readouterr().out.startswith("{")


def test_liveness_command(server: LocalTritonServer) -> None:
    (argv,) = [list(c.argv) for c in COMMANDS if c.argv[:3] == ("python", "-m", "wholebody.health")]
    argv[argv.index("localhost:8001")] = server.grpc_url
    done = run(argv)
    assert done.returncode == 0 and done.stdout.startswith("healthy"), done.stdout + done.stderr


def test_wire_contract_perf_analyzer_data_script(tmp_path: Path) -> None:
    page = REPO_ROOT / "docs" / "wire-contract.md"
    (script,) = [body for language, body in FENCE.findall(page.read_text())
                 if language in SHELL_LANGUAGES and "ct_data" in body]
    ct = nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), np.diag([3.0, 3.0, 3.0, 1.0]))
    nib.save(ct, tmp_path / "ct.nii.gz")
    data_part = script[:script.index("perf_analyzer ")]  # the options it prints go into perf_analyzer by hand
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", data_part.replace("python -", f"{sys.executable} -")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["--shape", "image_int16:6,5,4", "--output-shared-memory-size", "120"]
    data = tmp_path / "ct_data"
    assert np.array_equal(np.fromfile(data / "image_int16", "<i2").reshape(6, 5, 4), np.asarray(ct.dataobj))
    assert np.array_equal(np.fromfile(data / "affine", "<f8").reshape(4, 4), ct.affine)
    assert (data / "resolution").read_text() == "lowres\n" and (data / "network").read_text() == "torch_fp32\n"
