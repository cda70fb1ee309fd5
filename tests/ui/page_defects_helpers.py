"""Shared pieces of the issue-16 defect tests (test_page_defects*.py): ShapesWorld-like scenes drawn with
PIL, a page served with chosen settings, waiting for a turn to end, and reading the displayed heatmap."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (238, 238, 232)
TURN_MS = 120_000  # one demo-model turn on a busy 2-core CPU, with room


def scene(shape: str, colour: tuple, where: str, size: int = 192) -> Image.Image:
    """One flat shape on a light background, at the top left ("tl") or the bottom right ("br")."""
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    r = size // 6
    cx, cy = (size * 0.25, size * 0.25) if where == "tl" else (size * 0.75, size * 0.75)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def save(im: Image.Image, path: Path) -> str:
    im.save(path)
    return str(path)


def serve_page(engine, settings):
    """The page alone (no /v1 API) with the given Settings, on a free loopback port."""
    from fastapi import FastAPI

    from autoglm_app.server import serve_in_thread
    from autoglm_app.ui.layout import mount_ui

    return serve_in_thread(mount_ui(FastAPI(), engine, settings))


def user_messages(page):
    """The user's text bubbles (an attached image is a bubble of its own, with no text)."""
    return page.locator('#chat [data-testid="user"]').filter(has_text=re.compile(r"\S"))


def user_texts(page) -> list[str]:
    return [t.strip() for t in page.locator('#chat [data-testid="user"]').all_inner_texts() if t.strip()]


def bot_messages(page):
    return page.locator('#chat [data-testid="bot"]')


def wait_idle(page, timeout_ms: int = TURN_MS) -> None:
    """Every Gradio status tracker hidden: no event pending or streaming."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=status-tracker]')]"
        ".every(t => t.classList.contains('hide') || !(t.classList.contains('pending') "
        "|| t.classList.contains('generating')))", timeout=timeout_ms)
    time.sleep(0.4)


def wait_turns(page, n: int, timeout_ms: int = TURN_MS) -> None:
    """n user messages in the chat and the turn's events done."""
    from playwright.sync_api import expect

    page.wait_for_function(
        "n => [...document.querySelectorAll('#chat [data-testid=user]')].filter(m => m.innerText.trim()).length === n",
        arg=n, timeout=timeout_ms)
    expect(bot_messages(page).last).to_be_visible(timeout=timeout_ms)
    wait_idle(page, timeout_ms)


def send(page, text: str, files=(), n_after: int | None = None) -> None:
    """Type (and attach), press Send; with n_after, wait until the chat holds that many turns and is idle."""
    if files:
        page.locator("#prompt input[type=file]").set_input_files(list(files))
        page.locator("#prompt img").first.wait_for(timeout=15_000)
    page.locator("#prompt textarea").fill(text)
    page.locator("#send").click()
    if n_after is not None:
        wait_turns(page, n_after)


def open_settings(page) -> None:
    """Open the Generation settings accordion (once)."""
    if not page.locator("#seed input").is_visible():
        page.get_by_text("Generation settings").click()
        page.locator("#seed input").wait_for(state="visible")


def pick_radio(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id}").get_by_label(label, exact=True).check()


def warnings(page):
    return page.locator('[data-testid="toast-body"].warning')


def error_badges(page) -> int:
    """Gradio's red "Error" status badges and error toasts on the page."""
    return page.locator('[data-testid="status-tracker"] .error, [data-testid="toast-body"].error').count()


def shown_image(page, selector: str = "#focus-image img") -> Image.Image:
    src = page.locator(selector).get_attribute("src")
    assert src, f"{selector} has no src"
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def heat_peak(overlay: Image.Image, original: Image.Image, grid: int = 8) -> tuple[float, float]:
    """Where the heatmap is strongest, as (x, y) in 0..1: the cell of a grid x grid split (the model's patch
    grid) in which the displayed picture differs most from the original (the overlay's opacity grows with
    the map's strength, so unattended cells keep the photo)."""
    base = np.asarray(original.convert("RGB").resize(overlay.size, Image.BILINEAR), dtype=np.float32)
    diff = np.abs(np.asarray(overlay, dtype=np.float32) - base).sum(axis=2)
    h, w = diff.shape
    cells = np.array([[diff[r * h // grid:(r + 1) * h // grid, c * w // grid:(c + 1) * w // grid].mean()
                       for c in range(grid)] for r in range(grid)])
    r, c = np.unravel_index(int(np.argmax(cells)), cells.shape)
    return (c + 0.5) / grid, (r + 0.5) / grid


def percentages(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)\s*%", text)]
