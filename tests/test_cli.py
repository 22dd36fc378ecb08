"""The command line as a user meets it (issue 17), always through the real CLI
in a subprocess: exit codes, what stderr says (one line, the option or file
named once, no traceback, no ``--resume`` advice without a state), and which
files are left behind."""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import vhdcore
from vhdcore._workloads import make_chain

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]
PKG_ROOT = Path(vhdcore.__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None, umask=None, input=None):
    full_env = dict(os.environ)
    full_env.pop("VHDCORE_DEBUG", None)
    # the vhdcore under test, whatever the working directory
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(PKG_ROOT)] + [p for p in full_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "vhdcore", *map(str, args)], capture_output=True, text=True,
        cwd=cwd, env=full_env, input=input,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def one_clean_line(r) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_chain(tmp_path_factory.mktemp("chain"), "realistic", size=16 * MiB, layers=2,
                      seed=11, block_size=512 * 1024)


@pytest.fixture
def state_env(tmp_path):
    """An empty $XDG_STATE_HOME, so that job states left behind can be seen."""
    d = tmp_path / "xdg-state"
    d.mkdir()
    return {"XDG_STATE_HOME": str(d)}


# ---------------------------------------------------------------- usage and validation
BAD_VALUES = [
    (["image", "L", "--to", "file:///x/y", "--concurrency", "0"], "--concurrency"),
    (["image", "L", "--to", "file:///x/y", "--threads", "0"], "--threads"),
    (["image", "L", "--to", "file:///x/y", "--timeout", "-5"], "--timeout"),
    (["image", "L", "--to", "file:///x/y", "--timeout", "soon"], "--timeout"),
    (["image", "L", "--to", "file:///x/y", "--coalesce-timeout", "-1"], "--coalesce-timeout"),
    (["image", "L", "--to", "file:///x/y", "--segment-size", "10X"], "--segment-size"),
    (["image", "L", "--to", "file:///x/y", "--segment-size", "0"], "--segment-size"),
    (["image", "L", "--to", "file:///x/y", "--max-depth", "0"], "--max-depth"),
    (["create", "new.vhd", "--size", "1.5X"], "--size"),
    (["create", "new.vhd", "--size", "0"], "--size"),
    (["create", "new.vhd", "--size", "1G", "--block-size", "3K"], "--block-size"),
    (["create", "new.vhd", "--size", "1G", "--type", "sparse"], "--type"),
    (["write", "d.vhd", "--offset", "-1", "--from", "x"], "--offset"),
    (["flatten", "L", "out.vhd", "--threads", "-2"], "--threads"),
    (["flatten", "L", "out.vhd", "--format", "qcow2"], "--format"),
    (["estimate", "L", "--upload-rate", "fast"], "--upload-rate"),
    (["restore", "file:///x/y", "out.vhd", "--concurrency", "0"], "--concurrency"),
    (["coalesce", "c.vhd", "--timeout", "-3"], "--timeout"),
    (["verify", "file:///x/y", "--concurrency", "0"], "--concurrency"),
    (["bench", "--reps", "0"], "--reps"),
    (["demo", "--size", "lots"], "--size"),
]


@pytest.mark.parametrize("argv,option", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_option_values_are_usage_errors(tmp_path, argv, option, state_env):
    r = cli(*argv, cwd=tmp_path, env=state_env)
    assert r.returncode == 2, r.stderr
    line = one_clean_line(r)
    assert option in line and "error" in line
    assert tree(tmp_path) == ["xdg-state"], "a usage error created files"


def test_size_suffixes(tmp_path):
    for name, size, want in (("a.vhd", "10G", 10 << 30), ("b.vhd", "512K", 512 << 10),
                             ("c.vhd", "1.5T", 3 << 39)):
        r = cli("create", tmp_path / name, "--size", size)
        assert r.returncode == 0, r.stderr
        info = json.loads(cli("info", tmp_path / name, "--json").stdout)
        assert info["virtual_size"] == want
    r = cli("create", tmp_path / "d.vhd", "--size", "64M", "--block-size", "512K")
    assert r.returncode == 0, r.stderr
    assert json.loads(cli("info", tmp_path / "d.vhd", "--json").stdout)["block_size"] == 512 << 10


EXCLUSIVE = [
    (["image", "L", "--to", "file:///x/y", "--resume", "--restart"], ("--resume", "--restart")),
    (["image", "L", "--to", "file:///x/y", "--json", "-q"], ("--json", "--quiet")),
    (["image", "L", "--to", "file:///x/y", "--fs-aware", "--no-fs-aware"],
     ("--fs-aware", "--no-fs-aware")),
    (["cat", "L", "-o", "out.raw", "--stdout"], ("--output", "--stdout")),
    (["flatten", "L", "o.vhd", "--fs-aware", "--no-fs-aware"], ("--fs-aware", "--no-fs-aware")),
]


@pytest.mark.parametrize("argv,options", EXCLUSIVE, ids=[" ".join(a) for a, _ in EXCLUSIVE])
def test_mutually_exclusive_options(tmp_path, argv, options):
    r = cli(*argv, cwd=tmp_path)
    assert r.returncode == 2
    line = one_clean_line(r)
    assert all(o in line for o in options), line
    assert tree(tmp_path) == []


def test_other_usage_errors(tmp_path, chain):
    r = cli("create", "x.vhd", "--size", "8M", "--type", "fixed", "--block-size", "512K",
            cwd=tmp_path)
    assert r.returncode == 2 and "--block-size" in one_clean_line(r)
    r = cli("fsmap", chain.leaf, "--ranges")
    assert r.returncode == 2 and "--json" in one_clean_line(r)
    assert tree(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["image", "LEAF", "--to", "ftp://host/image"],
    ["restore", "gs://bucket/image", "out.vhd"],
    ["verify", "http://example.invalid/x"],
    ["ls", "ftp://host/"],
    ["rm", "ftp://host/image"],
])
def test_unknown_url_scheme_lists_the_supported_ones(tmp_path, chain, state_env, argv):
    argv = [str(chain.leaf) if a == "LEAF" else a for a in argv]
    r = cli(*argv, cwd=tmp_path, env=state_env)
    assert r.returncode == 2
    line = one_clean_line(r)
    assert "scheme" in line and "--resume" not in line
    for form in ("file://", "swift://", "s3://"):
        assert form in line
    assert tree(tmp_path) == ["xdg-state"]


def test_help_lines_descriptions_and_examples():
    r = cli("--help", env={"COLUMNS": "80"})
    assert r.returncode == 0
    from vhdcore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = r.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "COMMAND")
    listed = {}
    for ln in lines[start + 1:]:
        if not ln.startswith("    "):
            break
        m = re.match(r"^    (\S+)\s+(\S.*)$", ln)
        assert m, f"a command's description spans several lines: {ln!r}"
        listed[m.group(1)] = m.group(2)
    assert set(listed) == set(sub.choices)
    for name in sub.choices:
        h = cli(name, "--help")
        assert h.returncode == 0
        body = h.stdout.split("\n\n")
        assert len(body) >= 3 and len(body[1].split()) >= 8, f"{name}: no description"
        examples = [ln.strip()[2:] for ln in h.stdout.splitlines() if ln.strip().startswith("$ vhdcore ")]
        assert examples, f"{name} --help has no example"
        for ex in examples:  # every example parses
            words = shlex.split(ex.split("|")[0])[1:]
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parser.parse_args(words)
            except SystemExit:
                pytest.fail(f"example {ex!r} does not parse: {err.getvalue().strip()}")


# ---------------------------------------------------------------- failures and state
def test_job_that_cannot_start_leaves_no_state(tmp_path, chain, state_env):
    no_creds = {**state_env, "ST_AUTH": "", "ST_USER": "", "ST_KEY": "", "OS_AUTH_URL": "",
                "OS_STORAGE_URL": "", "OS_AUTH_TOKEN": ""}
    r = cli("image", chain.leaf, "--to", "swift://images/web01", cwd=tmp_path, env=no_creds)
    assert r.returncode == 1
    err = r.stderr
    assert "credentials" in err and "--resume" not in err and "Traceback" not in err
    # an URL without a name
    r = cli("image", chain.leaf, "--to", "swift://images", cwd=tmp_path, env=no_creds)
    assert r.returncode == 2 and "--resume" not in r.stderr
    # a file:// target whose directory cannot be made
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    r = cli("image", chain.leaf, "--to", f"file://{blocker}/sub/image", cwd=tmp_path,
            env=state_env)
    assert r.returncode in (1, 3) and "--resume" not in r.stderr and "Traceback" not in r.stderr
    assert "no job state was kept" in r.stderr or r.returncode == 1
    assert tree(tmp_path) == ["afile", "xdg-state"]


@pytest.mark.slow
def test_unreachable_endpoint_leaves_no_state(tmp_path, chain, state_env):
    env = {**state_env, "ST_AUTH": "http://127.0.0.1:9/auth/v1.0", "ST_USER": "a:b",
           "ST_KEY": "k", "OS_STORAGE_URL": "", "OS_AUTH_TOKEN": ""}
    r = cli("image", chain.leaf, "--to", "swift://images/web01", cwd=tmp_path, env=env)
    assert r.returncode == 3, r.stderr
    assert "--resume" not in r.stderr and "Traceback" not in r.stderr
    assert "no job state was kept" in r.stderr
    assert tree(tmp_path) == ["xdg-state"]


def test_missing_container_is_created_and_missing_bucket_leaves_no_state(tmp_path, chain,
                                                                          state_env):
    from _swift import require_s3, swift_connection, unique

    require_s3()
    container = unique("cli-new")
    r = cli("image", chain.leaf, "--to", f"swift://{container}/disk", "--json", env=state_env)
    assert r.returncode == 0, r.stderr
    conn = swift_connection()
    conn.head_container(container)
    conn.head_container(f"{container}_segments")
    # S3 buckets are not created: the job refuses before it starts
    bucket = unique("cli-none").lower()
    r = cli("image", chain.leaf, "--to", f"s3://{bucket}/disk", cwd=tmp_path, env=state_env)
    assert r.returncode == 1 and "does not exist" in r.stderr and "--resume" not in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["xdg-state"]
    assert [p for p in (tmp_path / "xdg-state").rglob("*") if p.is_file()] == []


def test_resume_advised_only_when_there_is_a_state(tmp_path, chain):
    url = f"file://{tmp_path}/out/image"
    r = cli("image", chain.leaf, "--to", url, "--timeout", "0", "-q")
    assert r.returncode == 4 and "--resume" in r.stderr
    assert (tmp_path / "out" / "image.vhdcore-job.json").exists()
    r = cli("image", chain.leaf, "--to", url, "--resume", "-q")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "image.vhdcore-job.json").exists()


def test_errors_are_one_sentence_and_debug_shows_the_traceback(tmp_path, chain):
    r = cli("info", tmp_path / "missing.vhd")
    line = one_clean_line(r)
    assert r.returncode == 1 and line.count("missing.vhd") == 1
    bad = tmp_path / "x.vhd"
    bad.write_bytes(b"hello")
    r = cli("info", bad)
    line = one_clean_line(r)
    assert r.returncode == 1 and line.count("x.vhd") == 1
    r = cli("flatten", chain.leaf, tmp_path / "no" / "such" / "dir" / "flat.vhd")
    line = one_clean_line(r)
    assert r.returncode == 1 and "[Errno" not in line and "does not exist" in line
    assert line.count("flat.vhd") == 1
    for extra, env in ((["--debug"], None), ([], {"VHDCORE_DEBUG": "1"})):
        r = cli(*extra, "info", bad, env=env)
        assert r.returncode == 1 and "Traceback" in r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("vhdcore: error:")
    r = cli("info", bad, "--debug")  # also after the subcommand
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_one_error_mapping_for_every_command(tmp_path, capsys):
    """The core, repository and fleet commands map an error to the same exit
    code and message (vhdcore.cli._common), whichever command meets it."""
    from vhdcore import errors
    from vhdcore.cli import _common, exit_code
    from vhdcore.cli import fleet as fleet_cli
    from vhdcore.cli import repo as repo_cli

    assert exit_code(errors.VhdTimeoutError("t")) == 4
    for exc in (errors.StoreAuthError("a"), errors.StoreNotFoundError("n"),
                errors.OutputExistsError("o"), errors.JobStateError("j"), errors.FormatError("f")):
        assert exit_code(exc) == 1, exc
    for exc in (errors.StoreError("s"), errors.UploadError("u"), OSError(5, "io")):
        assert exit_code(exc) == 3, exc
    assert repo_cli.fail is _common.fail and fleet_cli.fail is _common.fail
    for mod in (repo_cli, fleet_cli):  # no exit codes of their own
        tree = ast.parse(inspect.getsource(mod))
        assert not [t.id for node in tree.body if isinstance(node, ast.Assign)
                    for tgt in node.targets for t in ast.walk(tgt)
                    if isinstance(t, ast.Name) and t.id.startswith("EXIT_")], mod.__name__
    ns = argparse.Namespace(debug=False)
    missing = tmp_path / "gone.vhd"
    exc = FileNotFoundError(2, "No such file or directory", str(missing))
    assert _common.fail(exc, ns, as_json=True) == 3
    out, err = capsys.readouterr()
    event = json.loads(out)
    assert event["event"] == "error" and event["exit_code"] == 3
    assert event["message"] == f"{missing}: does not exist" and "[Errno" not in err
    assert err.strip() == f"vhdcore: error: {missing}: does not exist"


def test_file_target_directory_is_created_like_mkdir_p(tmp_path, chain):
    url = f"file://{tmp_path}/a/b/c/image"
    r = cli("image", chain.leaf, "--to", url, "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "a" / "b" / "c" / "image.manifest.json").is_file()
    if not (ROOT / "README.md").is_file():
        pytest.skip("the docs are not beside the tests (an installed package)")
    text = (ROOT / "README.md").read_text()
    assert "must exist" not in text and "mkdir -p" in text
    assert "mkdir -p" in (ROOT / "docs" / "cli.md").read_text()


# ---------------------------------------------------------------- defaults and policies
def test_fs_aware_is_the_default_everywhere():
    from vhdcore.coalesce import flatten
    from vhdcore.estimate import estimate
    from vhdcore.imaging import create_image

    for fn in (create_image, flatten, estimate):
        assert inspect.signature(fn).parameters["fs_aware"].default is True, fn.__name__
    from vhdcore.cli import build_parser

    p = build_parser()
    for cmd in (["image", "L", "--to", "file:///x/y"], ["flatten", "L", "o"], ["estimate", "L"]):
        assert p.parse_args(cmd).fs_aware is True
        assert p.parse_args(cmd + ["--no-fs-aware"]).fs_aware is False


def test_estimate_estimates_what_image_stores(tmp_path):
    from _fsimages import ext_rm, make_ext, need, random_files

    need("mke2fs", "debugfs")
    src = tmp_path / "src"
    names = sorted(random_files(src, 8, 400 * 1024, 700 * 1024, seed=4))
    raw = tmp_path / "fs.img"
    make_ext(raw, 24 * MiB, ["-t", "ext4", "-b", "4096"], src)
    ext_rm(raw, names[:6])
    disk = tmp_path / "disk.vhd"
    assert cli("create", disk, "--size", "24M", "--block-size", "512K").returncode == 0
    r = cli("write", disk, "--offset", "0", "--from", raw, "--sparse")
    assert r.returncode == 0, r.stderr
    est = json.loads(cli("estimate", disk, "--json").stdout)
    plain = json.loads(cli("estimate", disk, "--json", "--no-fs-aware").stdout)
    r = cli("image", disk, "--to", f"file://{tmp_path}/img", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["event"] == "result"
    assert est["blocks_stored"] == res["blocks_stored"] < plain["blocks_stored"]
    assert est["stream_bytes"] == res["stream_size"]
    assert res["metadata"]["fs-aware"] == "yes"


def _make_outputs(tmp_path, chain):
    """Run every file-writing command once; return (argv, output) pairs."""
    img = f"file://{tmp_path}/store/image"
    assert cli("image", chain.leaf, "--to", img, "-q").returncode == 0
    runs = [
        (["create", tmp_path / "new.vhd", "--size", "8M"], tmp_path / "new.vhd"),
        (["snapshot", tmp_path / "snap.vhd", "--parent", tmp_path / "new.vhd"],
         tmp_path / "snap.vhd"),
        (["cat", chain.leaf, "-o", tmp_path / "disk.raw"], tmp_path / "disk.raw"),
        (["flatten", chain.leaf, tmp_path / "flat.vhd", "-q"], tmp_path / "flat.vhd"),
        (["compact", chain.leaf, tmp_path / "small.vhd", "-q"], tmp_path / "small.vhd"),
        (["restore", img, tmp_path / "restored.vhd"], tmp_path / "restored.vhd"),
    ]
    for argv, out in runs:
        r = cli(*argv)
        assert r.returncode == 0, (argv, r.stderr)
        assert out.exists()
    return img, runs


def test_one_overwrite_policy(tmp_path, chain):
    img, runs = _make_outputs(tmp_path, chain)
    for argv, out in runs:
        before = sha(out)
        r = cli(*argv)
        assert r.returncode == 1, argv
        line = one_clean_line(r)
        assert "already exists" in line and "--force" in line and line.count(out.name) == 1
        assert sha(out) == before, f"{argv[0]} changed the existing output"
    for argv, out in runs:
        r = cli(*argv, "--force")
        assert r.returncode == 0, (argv, r.stderr)
    manifest = tmp_path / "store" / "image.manifest.json"
    before = sha(manifest)
    r = cli("image", chain.leaf, "--to", img, "-q")
    assert r.returncode == 1 and "--replace" in one_clean_line(r)
    assert "--resume" not in r.stderr and sha(manifest) == before
    assert not (tmp_path / "store" / "image.vhdcore-job.json").exists()
    r = cli("image", chain.leaf, "--to", img, "-q", "--replace")
    assert r.returncode == 0, r.stderr


def test_new_files_honour_the_umask(tmp_path, chain):
    for umask, want in ((0o002, 0o664), (0o077, 0o600)):
        d = tmp_path / f"u{umask:o}"
        d.mkdir()
        img = f"file://{d}/store/image"
        assert cli("create", d / "n.vhd", "--size", "8M", umask=umask).returncode == 0
        assert cli("flatten", chain.leaf, d / "f.vhd", "-q", umask=umask).returncode == 0
        assert cli("cat", chain.leaf, "-o", d / "c.raw", umask=umask).returncode == 0
        assert cli("image", chain.leaf, "--to", img, "-q", umask=umask).returncode == 0
        assert cli("restore", img, d / "r.vhd", umask=umask).returncode == 0
        assert cli("restore", img, d / "r.raw", "--format", "raw", umask=umask).returncode == 0
        files = [d / "n.vhd", d / "f.vhd", d / "c.raw", d / "r.vhd", d / "r.raw",
                 d / "store" / "image.manifest.json", *(d / "store" / "image.segments").iterdir()]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode))
    # the job state stays private whatever the umask
    r = cli("image", chain.leaf, "--to", f"file://{tmp_path}/js/image", "--timeout", "0", "-q",
            umask=0o002)
    assert r.returncode == 4
    assert stat.S_IMODE((tmp_path / "js" / "image.vhdcore-job.json").stat().st_mode) == 0o600


def test_swiftclient_is_a_core_dependency_and_boto3_names_its_extra(tmp_path, chain):
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d.split(">")[0].split("=")[0].strip() for d in meta["dependencies"]]
    assert "python-swiftclient" in deps and "tqdm" in deps and "boto3" not in deps
    assert any(d.startswith("boto3") for d in meta["optional-dependencies"]["s3"])
    code = ("import sys; sys.modules['boto3'] = None; from vhdcore.cli import main; "
            f"sys.exit(main(['image', {str(chain.leaf)!r}, '--to', 's3://bucket/key']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(PKG_ROOT)})
    assert r.returncode != 0 and "pip install 'vhdcore[s3]'" in r.stderr
    assert "Traceback" not in r.stderr and "--resume" not in r.stderr


# ---------------------------------------------------------------- output
def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, chain):
    r = cli("image", chain.leaf, "--to", f"file://{tmp_path}/image")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and lines
    assert all(ln.startswith("vhdcore: ") for ln in lines), lines
    up = [ln for ln in lines if ln.startswith("vhdcore: uploading (50%)")]
    assert up and "100.0%" in up[-1] and " of " in up[-1]
    r = cli("flatten", chain.leaf, tmp_path / "f.vhd")
    assert r.returncode == 0 and "100.0%" in r.stderr.splitlines()[-1]
    r = cli("flatten", chain.leaf, tmp_path / "g.vhd", "-q")
    assert r.returncode == 0 and r.stderr == ""


def test_progress_bar_on_a_terminal_ends_at_100_percent(tmp_path, chain):
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vhdcore", "image", str(chain.leaf),
                                 "--to", f"file://{tmp_path}/image"], stdout=subprocess.PIPE,
                                stderr=slave, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(PKG_ROOT)})
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate()
    finally:
        os.close(master)
    assert proc.returncode == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "Traceback" not in screen
    bars = [seg for seg in re.split(r"[\r\n]+", screen) if "uploading (50%)" in seg]
    assert bars and "100%" in bars[-1], bars[-3:]
    assert re.search(r"B/s", bars[-1]) and re.search(r"\d+(\.\d+)?[kMG]?i?B?/\d", bars[-1])
    coal = [seg for seg in re.split(r"[\r\n]+", screen) if "coalescing (25%)" in seg]
    assert coal and "100%" in coal[-1]


def test_json_events_follow_the_documented_schema(tmp_path, chain):
    from vhdcore.imaging import EVENT_FIELDS, EVENT_VERSION

    documented = {name for name, _, _ in EVENT_FIELDS}
    r = cli("image", chain.leaf, "--to", f"file://{tmp_path}/image", "--json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in r.stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and events[-1]["event"] == "result"
    assert all(e["version"] == EVENT_VERSION for e in events)
    for e in progress:
        assert set(e) <= documented, set(e) - documented
        assert {"stage", "percent", "bytes_done", "bytes_total", "message", "version"} <= set(e)
        if "rate" in e:
            assert 0 <= e["rate"] < 100e9  # no 68 TB/s
    assert progress[-1]["stage"] == "done" and progress[-1]["percent"] == 100
    if (ROOT / "docs" / "cli.md").is_file():  # absent beside an installed package's tests
        text = (ROOT / "docs" / "cli.md").read_text()
        assert "## JSON progress events" in text
        for name in documented:
            assert f"| `{name}` |" in text


def test_rate_is_measured_over_a_window_and_omitted_until_meaningful(monkeypatch):
    import vhdcore.imaging as imaging

    class Clock:
        t = 1000.0

        def monotonic(self):
            return self.t

        def __getattr__(self, name):
            import time
            return getattr(time, name)

    clock = Clock()
    monkeypatch.setattr(imaging, "time", clock)
    events = []
    rep = imaging._Reporter(events.append, interval=0)
    rep.enter("uploading", bytes_done=0, bytes_total=10**9)
    clock.t += 0.001
    rep.emit(bytes_done=68 * 10**6, bytes_total=10**9)  # 68 MB "in a millisecond"
    assert events[-1].rate is None and "rate" not in events[-1].to_json()
    assert "eta" not in events[-1].to_json()
    for _ in range(20):  # then a steady 10 MB/s
        clock.t += 0.5
        rep.emit(bytes_done=events[-1].bytes_done + 5 * 10**6, bytes_total=10**9)
    assert events[-1].rate == pytest.approx(10e6, rel=0.01)
    assert events[-1].eta is not None and events[-1].to_json()["rate"] > 0


def test_info_iso_times_locators_and_sizes(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    assert cli("create", base, "--size", "64M").returncode == 0
    assert cli("snapshot", child, "--parent", base).returncode == 0
    r = cli("info", child)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.search(rf"^timestamp\s+{iso}$", text, re.M)
    assert re.search(rf"^parent timestamp\s+{iso}$", text, re.M)
    assert re.search(r"^virtual size\s+64\.0 MiB \(67108864 bytes\)$", text, re.M)
    locs = [ln for ln in text.splitlines() if ln.startswith("parent locator")]
    assert locs and all("{" not in ln for ln in locs)
    assert any(re.search(r"W2ru \(Windows, relative path\): .*base\.vhd$", ln) for ln in locs), locs
    d = json.loads(cli("info", child, "--json").stdout)
    assert re.fullmatch(iso, d["timestamp"]) and isinstance(d["timestamp_vhd"], int)
    assert d["virtual_size"] == 64 * MiB and isinstance(d["file_size"], int)
    assert {"code", "path"} <= set(d["parent_locators"][0])


def test_write_sparse(tmp_path):
    disk, plain = tmp_path / "s.vhd", tmp_path / "p.vhd"
    for d in (disk, plain):
        assert cli("create", d, "--size", "16M", "--block-size", "512K").returncode == 0
    data = bytearray(6 * MiB)
    data[100:612] = os.urandom(512)             # block 0
    data[5 * MiB + 7: 5 * MiB + 4000] = os.urandom(3993)  # block 10
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(data))
    r = cli("write", disk, "--offset", "1000", "--from", src, "--sparse")
    assert r.returncode == 0, r.stderr
    assert cli("write", plain, "--offset", "1000", "--from", src).returncode == 0
    sparse_info = json.loads(cli("info", disk, "--json").stdout)
    plain_info = json.loads(cli("info", plain, "--json").stdout)
    assert sparse_info["allocated_blocks"] == 2 < plain_info["allocated_blocks"]
    for d in (disk, plain):
        out = tmp_path / (d.stem + ".raw")
        assert cli("cat", d, "-o", out).returncode == 0
        raw = out.read_bytes()
        assert raw[1000:1000 + len(data)] == bytes(data) and raw.count(0) == len(raw) - sum(
            1 for b in data if b)
    # zeros over data that is there are written (the disk reads what the file says)
    zeros = tmp_path / "z.bin"
    zeros.write_bytes(bytes(8192))
    assert cli("write", disk, "--offset", "0", "--from", zeros, "--sparse").returncode == 0
    out = tmp_path / "again.raw"
    assert cli("cat", disk, "-o", out).returncode == 0
    assert out.read_bytes()[:8192] == bytes(8192)


# ---------------------------------------------------------------- ls / rm / verify
def _incomplete(directory: Path, name: str) -> None:
    from vhdcore.store import DirectoryStore, md5_hex

    s = DirectoryStore(directory, name)
    s.put_segment(0, b"partial", md5_hex(b"partial"))


def test_ls_rm_verify_on_a_directory(tmp_path, chain):
    store = tmp_path / "store"
    for name in ("web01", "web02"):
        r = cli("image", chain.leaf, "--to", f"file://{store}/{name}", "-q")
        assert r.returncode == 0, r.stderr
    _incomplete(store, "web03")
    r = cli("ls", f"file://{store}/")
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines()[1:]}
    assert set(rows) == {"web01", "web02", "web03"}
    assert rows["web01"].rstrip().endswith(" complete") and rows["web03"].rstrip().endswith("incomplete")
    assert re.search(r"\d{4}-\d\d-\d\dT", rows["web01"]) and "16.0 MiB" in rows["web01"]
    listing = json.loads(cli("ls", store, "--json").stdout)
    by = {e["name"]: e for e in listing}
    assert by["web01"]["complete"] and not by["web03"]["complete"]
    assert by["web01"]["virtual_size"] == 16 * MiB and by["web01"]["size"] > 0
    assert [e["name"] for e in json.loads(cli("ls", f"file://{store}/web0", "--json").stdout)] \
        == ["web01", "web02", "web03"]
    # verify reads everything and writes nothing
    before = tree(tmp_path)
    r = cli("verify", f"file://{store}/web01")
    assert r.returncode == 0 and "ok" in r.stdout and tree(tmp_path) == before
    seg = sorted((store / "web02.segments").glob("*.lz4"))[-1]
    blob = bytearray(seg.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    seg.write_bytes(bytes(blob))
    r = cli("verify", f"file://{store}/web02")
    assert r.returncode == 1 and "damaged" in one_clean_line(r) and tree(tmp_path) == before
    r = cli("verify", f"file://{store}/web03")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # rm refuses a partial image unless --force, removes a complete one wholly
    r = cli("rm", f"file://{store}/web03")
    assert r.returncode == 1 and "--force" in one_clean_line(r)
    assert (store / "web03.segments").is_dir()
    assert cli("rm", f"file://{store}/web03", "--force").returncode == 0
    assert cli("rm", f"file://{store}/web01").returncode == 0
    assert sorted(p.name for p in store.iterdir()) == ["web02.manifest.json", "web02.segments"]
    r = cli("rm", f"file://{store}/web01")
    assert r.returncode == 1 and "no image" in one_clean_line(r)


def test_ls_and_verify_take_a_url_or_a_repository(tmp_path):
    from vhdcore.repo.core import init_repo

    repo = f"file://{tmp_path}/repo"
    init_repo(repo)
    for argv in (["ls", "--repo", repo], ["verify", "--repo", repo]):
        r = cli(*argv)
        assert r.returncode == 0, r.stderr
    # neither a URL nor a repository: a usage error that names both
    for argv in (["ls"], ["verify"]):
        r = cli(*argv, env={"VHDCORE_REPO": ""})
        assert r.returncode == 2 and "--repo" in one_clean_line(r)
    r = cli("ls", "ftp://a/")
    assert r.returncode == 2 and "swift://" in one_clean_line(r)


def test_ls_rm_verify_on_swift(tmp_path, chain):
    from _swift import require_swift, swift_connection, unique

    require_swift()
    container = unique("cli-ls")
    for name in ("a/one", "a/two"):
        assert cli("image", chain.leaf, "--to", f"swift://{container}/{name}", "-q").returncode == 0
    conn = swift_connection()
    conn.put_object(f"{container}_segments", "a/three/00000000", b"partial")
    listing = json.loads(cli("ls", f"swift://{container}/a/", "--json").stdout)
    assert [(e["name"], e["complete"]) for e in listing] == [
        ("a/one", True), ("a/three", False), ("a/two", True)]
    assert cli("verify", f"swift://{container}/a/one").returncode == 0
    assert cli("rm", f"swift://{container}/a/three").returncode == 1
    assert cli("rm", f"swift://{container}/a/three", "--force").returncode == 0
    assert cli("rm", f"swift://{container}/a/one").returncode == 0
    _, left = conn.get_container(f"{container}_segments")
    assert all(not o["name"].startswith(("a/one/", "a/three/")) for o in left)
    assert [e["name"] for e in json.loads(cli("ls", f"swift://{container}", "--json").stdout)] \
        == ["a/two"]


# ---------------------------------------------------------------- docs
def test_docs_show_the_new_verbs_and_policies():
    if not (ROOT / "docs" / "cli.md").is_file():
        pytest.skip("the docs are not beside the tests (an installed package)")
    text = (ROOT / "docs" / "cli.md").read_text()
    for verb in ("ls", "rm", "verify"):
        assert f"## vhdcore {verb}\n" in text
    for phrase in ("--force", "--replace", "--no-fs-aware", "--sparse", "umask", "--debug"):
        assert phrase in text


def test_readme_command_table_matches_the_parser():
    from vhdcore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {ca.dest: ca.help for ca in sub._choices_actions}
    if not (ROOT / "README.md").is_file():
        pytest.skip("the README is not beside the tests (an installed package)")
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z]+)` \| (.+?) \|$", readme, re.M)
    assert dict(rows) == helps


def test_ls_rm_verify_on_s3(tmp_path, chain):
    from _swift import require_s3, s3_client, unique

    require_s3()
    bucket = unique("cli-ls").lower()
    s3 = s3_client()
    s3.create_bucket(Bucket=bucket)
    assert cli("image", chain.leaf, "--to", f"s3://{bucket}/one", "-q").returncode == 0
    up = s3.create_multipart_upload(Bucket=bucket, Key="two")
    s3.upload_part(Bucket=bucket, Key="two", UploadId=up["UploadId"], PartNumber=1, Body=b"x")
    listing = json.loads(cli("ls", f"s3://{bucket}", "--json").stdout)
    assert [(e["name"], e["complete"]) for e in listing] == [("one", True), ("two", False)]
    assert listing[0]["virtual_size"] == 16 * MiB
    r = cli("verify", f"s3://{bucket}/one")
    assert r.returncode == 0, r.stderr
    assert cli("rm", f"s3://{bucket}/two").returncode == 1
    assert cli("rm", f"s3://{bucket}/two", "--force").returncode == 0
    assert cli("rm", f"s3://{bucket}/one").returncode == 0
    assert json.loads(cli("ls", f"s3://{bucket}", "--json").stdout) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
