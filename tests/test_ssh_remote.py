"""An SSH remote against a real OpenSSH server on the loopback address, with dvc-ssh as the client.

The fixture starts Debian's /usr/sbin/sshd on 127.0.0.1 and a free port, with a throwaway host key and user key and
everything else (config, pid file, authorized keys, the remote's storage folder) in a temporary folder. The test
pushes the tiny run from one clone, pulls it into a second, and uses it there. It skips, with the reason, where
the server is not installed (`.ci/run` installs it under CI=true) or does not start. GPTLAB_TEST_SSHD names
another sshd binary (a missing path shows the skip).
"""
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import project_env, sh

SSHD = os.environ.get("GPTLAB_TEST_SSHD", "/usr/sbin/sshd")
MISSING = [tool for tool in (SSHD, "ssh-keygen", "ssh") if not shutil.which(tool)]
# decided at collection, so a machine without OpenSSH skips before the session's `dvc repro` (tiny_project)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(MISSING), reason=f"OpenSSH not installed ({', '.join(MISSING)} missing): `apt-get install openssh-server`,"
    " as .ci/run does under CI=true")]


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        return s.recv(64)


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on 127.0.0.1. Yields its port, the user to log in as, the user's private key file, and a home
    folder whose .ssh/known_hosts holds the server's host key."""
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host_key", "user_key"):  # throwaway keys, no passphrase
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    if os.geteuid() == 0:  # sshd started as root needs its privilege-separation folder
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user = getpass.getuser()  # root here; a non-root sshd can only log its own user in
    for _attempt in range(3):  # another process may take the free port between the probe and sshd's bind
        port = free_port()
        (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
# pytest's temporary folders are not root-owned all the way up
StrictModes no
Subsystem sftp internal-sftp
""")
        log = d / "sshd.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdin=subprocess.DEVNULL,
                                    stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 15
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = banner(port).startswith(b"SSH-2.0-")
            except OSError:
                pass
            if ready:
                break
            time.sleep(0.1)
        if ready:
            break
        proc.kill()
        proc.wait()
        if "Address already in use" not in log.read_text(errors="replace"):
            break
    if not ready:
        pytest.skip(f"sshd did not start (exit {proc.returncode}): {log.read_text(errors='replace').strip()[-2000:]}")
    try:
        # the host key as `ssh-keyscan -p PORT 127.0.0.1` records it. dvc-ssh 4.3.0 itself reads no known_hosts
        # (sshfs connects with asyncssh's known_hosts=None, so any host key is accepted); OpenSSH's client below
        # does, and the file sits in the $HOME the dvc commands run with, for any client that checks.
        host_key = (d / "host_key.pub").read_text().split()[:2]
        home = tmp_path / "home"  # the test's $HOME: no stray ~/.ssh keys or config of the machine's user
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        known_hosts = home / ".ssh" / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        # OpenSSH's client logs in with the key and accepts only the recorded host key
        login = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(d / "user_key"), "-o", "IdentitiesOnly=yes",
                                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                                "-o", f"UserKnownHostsFile={known_hosts}", "-p", str(port), f"{user}@127.0.0.1",
                                "echo", "logged-in"], check=False, capture_output=True, text=True, timeout=30)
        assert login.stdout.strip() == "logged-in", (login.stderr, log.read_text(errors="replace"))
        yield {"port": port, "user": user, "key": d / "user_key", "home": home}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # sshd and any session process it forked (its own group)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def remote_env(project: Path, home: Path) -> dict:
    env = project_env(project)
    env["HOME"] = str(home)
    return env


def test_ssh_remote_push_then_pull_into_a_second_clone_and_generate(tiny_project, sshd, tmp_path):
    src = shutil.copytree(tiny_project, tmp_path / "proj", symlinks=True)  # never touch the shared fixture
    env = remote_env(src, sshd["home"])

    def run(cmd: str, cwd: Path, check: bool = True):
        return sh(cmd, cwd, env=remote_env(cwd, sshd["home"]), check=check)

    assert "up to date" in run("dvc status", src).stdout  # a complete run to push
    store = tmp_path / "remote-store"
    store.mkdir()
    # What a team commits: the remote's URL (host, port, folder) as the default, and `verify` (a pull rehashes
    # what it downloads: dvc-ssh does not check the host key). What each machine keeps out of git
    # (.dvc/config.local): the login name and the key file.
    run(f"dvc remote add -d ssh ssh://127.0.0.1:{sshd['port']}{store} && dvc remote modify ssh verify true", src)
    local = f"dvc remote modify --local ssh user {sshd['user']} && dvc remote modify --local ssh keyfile {sshd['key']}"
    run(local, src)
    run("git add -A && git commit -qm 'run, ssh remote'", src)
    assert "keyfile" not in run("git show HEAD:.dvc/config", src).stdout

    lock = yaml.safe_load((src / "dvc.lock").read_text())["stages"]
    outs = sorted({o["path"] for stage in lock.values() for o in stage.get("outs", [])})
    assert {"checkpoints/pretrain", "checkpoints/dpo"} <= set(outs)

    # Nothing pushed yet: all local-only. Push one checkpoint only, then clone.
    status = run("dvc status -c", src).stdout
    assert "new:" in status and "checkpoints/dpo" in status and "checkpoints/pretrain" in status
    assert "pushed" in run("dvc push checkpoints/pretrain", src).stdout
    clone = tmp_path / "clone"
    sh(f"git clone -q {src} {clone}", tmp_path, env=env)
    assert not (clone / "checkpoints" / "pretrain").exists() and not (clone / "checkpoints" / "dpo").exists()
    run(local, clone)  # the clone's own machine-specific settings

    # A clone pulls only what was pushed: the pull fails and names what is missing; what was pushed arrives.
    partial = run("dvc pull", clone, check=False)
    assert partial.returncode != 0
    assert "checkpoints/dpo" in partial.stderr and "Checkout failed" in partial.stderr, partial.stderr
    assert digest(clone / "checkpoints" / "pretrain") == digest(src / "checkpoints" / "pretrain")
    assert not (clone / "checkpoints" / "dpo").exists()
    status = run("dvc status -c", src).stdout  # the pushing clone lists the rest as local-only
    assert "new:" in status and "checkpoints/dpo" in status and "checkpoints/pretrain" not in status

    run("dvc push", src)
    assert run("dvc status -c", src).stdout.strip() == "Cache and remote 'ssh' are in sync."
    run("dvc pull", clone)
    for out in outs:  # every output of dvc.lock, byte for byte
        assert digest(clone / out) == digest(src / out), out
    assert run("dvc status -c", clone).stdout.strip() == "Cache and remote 'ssh' are in sync."

    prompt = "Question: Where was"
    gen = run(f"gptlab generate checkpoints/dpo --prompt '{prompt}' --max_tokens 5 --temperature 0", clone)
    assert gen.stdout.startswith(prompt) and len(gen.stdout.strip()) > len(prompt), gen.stdout
    assert "up to date" in run("dvc status", clone).stdout  # the pulled run is complete: nothing to rerun
    # the pulled checkpoint says what made it: its ancestors by hash, the commit the pipeline ran at
    info = run("gptlab info checkpoints/dpo", clone).stdout
    lineage = json.loads((src / "checkpoints" / "dpo" / "meta.json").read_text())["lineage"]
    assert info.count("(same weights here)") == 2 and all(a["weights_sha256"][:12] in info for a in lineage)

