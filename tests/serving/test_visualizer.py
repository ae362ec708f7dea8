"""The trace option and the denoising visualiser, end to end: ``examples/visualize_denoising.py`` runs
in a pseudo-terminal against a real server, and a terminal emulator (pyte) reads what its screen
shows after every frame."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pyte
import requests

from tests.serving.server import stream_choices

REPO = Path(__file__).resolve().parents[2]
VISUALIZER = REPO / "examples" / "visualize_denoising.py"
MASK_GLYPH = "░"


def screens_of(args: list[str], columns: int = 160, rows: int = 50) -> list[list[str]]:
    """Run the visualiser in a pty; return the screen (its lines) each time a new frame was drawn."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(VISUALIZER), *args], stdin=slave, stdout=slave, stderr=slave,
                            env=dict(os.environ, TERM="xterm", COLUMNS=str(columns), LINES=str(rows)))
    os.close(slave)
    screen = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(screen)
    snapshots, raw = [], b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        raw += data
        # Feed one frame at a time (each draw starts by clearing the screen) and keep every frame.
        *complete, raw = raw.split(b"\x1b[2J")
        for part in complete:
            stream.feed(part)
            if any(line.strip() for line in screen.display):
                snapshots.append(list(screen.display))
            stream.feed(b"\x1b[2J")
    stream.feed(raw)
    snapshots.append(list(screen.display))
    os.close(master)
    assert proc.wait(timeout=60) == 0, "\n".join(snapshots[-1])
    return snapshots


def body(snapshot: list[str]) -> str:
    """The drawn text below the header, as one string (screen lines joined, trailing blanks cut)."""
    return "".join(line.rstrip() if i < len(snapshot) - 1 else line for i, line in enumerate(snapshot[2:])).rstrip()


def test_trace_frames_precede_their_text_and_leave_the_text_unchanged(sdlm_server, letters_ckpt):
    payload = {"model": str(letters_ckpt), "prompt": " a c e g i k", "max_tokens": 16, "temperature": 0,
               "vllm_xargs": {"threshold": 0.9, "trace": True}}
    chunks = stream_choices(sdlm_server, payload)
    frames = [c["blockdiff_trace"][0] for c in chunks if "blockdiff_trace" in c]
    texts = [c["text"] for c in chunks if "blockdiff_trace" not in c]
    plain = requests.post(f"{sdlm_server}/v1/completions", timeout=120,
                          json=payload).json()["choices"][0]["text"]
    assert "".join(texts) == plain
    assert [f["step"] for f in frames] == list(range(1, len(frames) + 1)) and frames[0]["position"] == 0
    for frame in frames:  # each frame comes right before the text of its step: its accepted prefix
        i = chunks.index(next(c for c in chunks if c.get("blockdiff_trace", [None])[0] is frame))
        accepted = "".join(frame["tokens"][: frame["accepted"]])
        assert accepted.startswith(chunks[i + 1]["text"]) and chunks[i + 1]["text"]


def test_visualizer_shows_the_sdlm_window_step_by_step(sdlm_server, letters_ckpt):
    screens = screens_of([" a c e g i k", "--completion", "--threshold", "0.9", "--max-tokens", "16",
                          "--base-url", f"{sdlm_server}/v1", "--delay", "0", "--no-color"])
    headers = [s[0] for s in screens]
    steps = [h for h in headers if "(sdlm)" in h]
    assert steps and "step 1 (sdlm)" in steps[0]
    final = screens[-1]
    assert "done:" in final[0]
    plain = requests.post(f"{sdlm_server}/v1/completions", timeout=120, json={
        "model": str(letters_ckpt), "prompt": " a c e g i k", "max_tokens": 16, "temperature": 0,
        "vllm_xargs": {"threshold": 0.9}}).json()["choices"][0]["text"]
    assert body(final) == plain
    # A frame shows the text so far plus the whole window, beyond what commits in that step.
    first = next(s for s in screens if "step 1 (sdlm)" in s[0])
    assert body(first).startswith(" m o q") and len(body(first)) >= 8


def test_visualizer_shows_the_bd3lm_block_filling_in(bd3lm_server):
    screens = screens_of(["Write a BFS in Python.", "--steps", "8", "--block-size", "16", "--max-tokens", "24",
                          "--base-url", f"{bd3lm_server}/v1", "--delay", "0", "--no-color"])
    frames = [s for s in screens if "(bd3lm)" in s[0]]
    masks = [body(s).count(MASK_GLYPH) for s in frames]
    assert frames and masks[0] > 0
    # Within a block the masks only fill in; a new block starts with masks again.
    blocks = [[masks[0]]]
    for count in masks[1:]:
        if count > blocks[-1][-1]:
            blocks.append([count])
        else:
            blocks[-1].append(count)
    assert len(blocks) >= 2 and all(len(b) >= 2 and b[-1] < b[0] for b in blocks)
    assert f"done: {len(frames)} steps" in screens[-1][0] and MASK_GLYPH not in body(screens[-1])
