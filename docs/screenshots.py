"""Regenerate docs/terminal.png and docs/report.png from a fresh `fluxbatch demo` (`make screenshots`).

The demo runs in a pseudo-terminal, as a user sees it: its phase lines, the progress bar and the summary. The
terminal's last screen is rebuilt from what it printed (a carriage return rewrites its line, as a terminal does;
colour codes are dropped), laid out as HTML and photographed by headless Chromium, like the report the run
wrote. Needs Chromium (`apt install chromium`); nothing else beyond `make setup`.
"""

from __future__ import annotations

import argparse
import fcntl
import html
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLUMNS = 110


def run_in_terminal(command: list[str], cwd: Path) -> tuple[int, str]:
    """`command`'s exit code and everything it wrote to its terminal (stdout and stderr, as one stream)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, COLUMNS, 0, 0))  # the bar's width
    env = {**os.environ, "COLUMNS": str(COLUMNS), "LINES": "50", "TERM": "xterm-256color"}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command and its children closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


def screen_lines(printed: str) -> list[str]:
    """The lines a terminal shows after `printed`: a carriage return starts its line over, overwriting."""
    lines = []
    for raw in ANSI.sub("", printed).replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return lines


def terminal_html(prompt: str, lines: list[str]) -> str:
    body = html.escape("\n".join([f"$ {prompt}", *lines]))
    return ("<!doctype html><meta charset='utf-8'><style>body{margin:0;background:#1e1e1e}"
            "pre{margin:0;padding:16px 20px;color:#d4d4d4;font:14px/1.45 'DejaVu Sans Mono',monospace;"
            f"white-space:pre}}</style><pre>{body}</pre>")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    sys.exit("make screenshots: Chromium is not installed here (apt install chromium); nothing was written")


def screenshot(browser: str, page: Path, into: Path, width: int, height: int, profile: Path) -> None:
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", f"--window-size={width},{height}",
                           f"--screenshot={into}", page.as_uri()], capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not into.is_file():
        sys.exit(f"Chromium could not photograph {page}: {done.stderr.strip()[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=DOCS, help="folder for terminal.png and report.png (docs/)")
    args = parser.parse_args(argv)
    browser = chromium()
    fluxbatch = str(Path(sys.executable).parent / "fluxbatch")
    with tempfile.TemporaryDirectory(prefix="fluxbatch-screenshots-") as folder:
        work = Path(folder)
        code, printed = run_in_terminal([fluxbatch, "demo", "demo-output"], cwd=work)
        lines = screen_lines(printed)
        if code not in (0, 1):  # 1: the demo's two bad rows, on purpose
            sys.exit(f"fluxbatch demo exited {code}:\n" + "\n".join(lines[-20:]))
        page = work / "terminal.html"
        page.write_text(terminal_html("fluxbatch demo demo-output", lines))
        width, height = 48 + 9 * max(map(len, lines)), 36 + 21 * (len(lines) + 1)  # 14 px DejaVu Sans Mono
        args.into.mkdir(parents=True, exist_ok=True)
        screenshot(browser, page, args.into / "terminal.png", width, height, work / "profile")
        screenshot(browser, work / "demo-output" / "report.html", args.into / "report.png", 1280, 1800,
                   work / "profile")
    print(f"wrote {args.into / 'terminal.png'} and {args.into / 'report.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
