"""The HTML report of a run: built from real runs of the tiny model, opened in headless Chromium with the
network unused, checked for console errors, its charts, a hover tooltip and text that cannot break the page."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import causal
from causal.app.cli import main
from causal.results import report
from causal.results.report import page_data, write_report
from causal.results.summary import bootstrap_ci, effect, mean, standard_error

pytestmark = pytest.mark.slow  # headless Chromium

CHROMIUM = "/usr/bin/chromium"
BODY = ("metric logprob(io)\nmetric logit_diff(io, s)\n"
        "patch resid_pre[layer=*, pos=*] from corrupt into clean\n"
        "ablate z[layer=*, head=*, pos=-2..-1] with zero as heads_by_pos\n"
        "ablate mlp_out[layer=*] with mean\n"
        "ablate z[layer=0, head=*] with zero as heads0")
HOSTILE = "</script><script>document.body.classList.add('pwned')</script><!-- <img src=x onerror=alert(1)>"


class Chromium:
    """Headless Chromium driven by the DevTools protocol over a pipe (--remote-debugging-pipe): no port, no
    websocket package, and no request leaves the machine."""

    def __init__(self, profile: Path):
        if not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"the report tests need headless Chromium at {CHROMIUM}: install Debian's chromium "
                        "(apt-get install -y chromium chromium-driver; .ci/run does)")
        to_us, from_them = _high(*os.pipe())  # Chromium writes its messages on fd 4
        to_them, from_us = _high(*os.pipe())  # and reads ours on fd 3
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=lambda: (os.dup2(to_them, 3), os.dup2(from_them, 4)))
        os.close(to_them)
        os.close(from_them)
        self._in, self._out, self._id = to_us, from_us, 0
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.session: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._in, 1 << 16):
            *messages, buffer = (buffer + chunk).split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _next(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("Chromium did not answer within the time allowed") from None
        if message is None:
            raise AssertionError(f"Chromium exited (status {self.process.poll()})")
        if "id" not in message:
            self.events.append(message)
        return message

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        sent = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            sent["sessionId"] = self.session
        os.write(self._out, json.dumps(sent).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while (message := self._next(deadline)).get("id") != self._id:
            pass
        assert "error" not in message, f"{method}: {message['error']}"
        return message["result"]

    def open(self, path: Path) -> None:
        """A fresh tab on the file; returns once its load event has fired."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + 60
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._next(deadline)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def hover(self, selector: str) -> str:
        """Moves the mouse onto the element's centre, as a person would; the tooltip's text then."""
        box = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                      " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
        assert self.js("document.getElementById('tip').hidden") is False, "no tooltip after the mouse moved there"
        return self.js("document.getElementById('tip').innerText")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and the browser's own error entries (a CSP block among them)."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif event["method"] == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("exception", {}).get("description", str(params)))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
            self.process.wait(timeout=10)
        except (AssertionError, OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)
        finally:
            os.close(self._out)


def _high(read_end: int, write_end: int) -> tuple[int, int]:
    """The pipe's ends moved above fd 4, so placing them at 3 and 4 in the child cannot overwrite one."""
    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (read_end, write_end))
    os.close(read_end)
    os.close(write_end)
    return moved


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


def _opened(browser: Chromium, page: Path) -> Chromium:
    browser.open(page)
    assert browser.errors() == []
    assert all(url.startswith("file://") for url in browser.requests()), browser.requests()  # offline
    return browser


def _count(browser: Chromium, selector: str) -> int:
    return browser.js(f"document.querySelectorAll({json.dumps(selector)}).length")


def _section(name: str) -> str:
    return f'section[data-variable="{name}"]'


def test_report_shows_every_intervention_with_hover_and_selectors(write_experiment, cpu_config, tmp_path, browser):
    ds = causal.run(write_experiment(BODY), cpu_config)
    page = write_report(ds, tmp_path / "report.html")
    assert page.stat().st_size < 100_000
    _opened(browser, page)
    assert _count(browser, "section.variable") == 4
    layers, positions = ds.sizes["layer"], list(ds["patch_resid_pre"].dropna("pos", how="all")["pos"].values)
    assert _count(browser, f"{_section('patch_resid_pre')} svg.heatmap rect.cell") == layers * len(positions)
    assert _count(browser, f"{_section('patch_resid_pre')} svg.colourbar") == 1
    assert _count(browser, f"{_section('heads_by_pos')} .panel") == 2  # one panel per position
    assert _count(browser, f"{_section('heads_by_pos')} svg.heatmap rect.cell") == 2 * layers * ds.sizes["head"]
    assert _count(browser, f"{_section('ablate_mlp_out')} svg.line-chart circle.point") == layers
    assert _count(browser, f"{_section('heads0')} svg.bar-chart rect.bar") == ds.sizes["head"]
    assert browser.js(f"document.querySelector('{_section('heads0')} h2').textContent") == \
        "heads0: Δ logprob(io) (layer=0)"

    cell = len(positions) + positions.index(1) + 1  # layer 1, pos 1: the panel's cells are row by row
    tip = browser.hover(f"{_section('patch_resid_pre')} rect.cell:nth-of-type({cell})")
    change = effect(ds, "patch_resid_pre").sel(layer=1, pos=1, metric="logprob(io)")
    token = str(ds["token_clean"].sel(pos=1).values[0])
    assert f"layer 1\npos 1\n  clean: \"{token}\"" in tip
    shown = float(re.search(r"mean Δ logprob\(io\): ([^\n]+)", tip).group(1).replace("−", "-"))
    assert np.isclose(shown, float(change.mean("example")), rtol=5e-3, atol=1e-9)
    assert re.search(rf"95% CI \[\S+, \S+\] over {int(change.notnull().sum())} examples", tip)

    browser.js("(() => { const s = document.querySelector('select[data-dim=metric]'); s.value = 'logit_diff(io, s)';"
               " s.dispatchEvent(new Event('change')); })()")
    assert _count(browser, "select[data-dim=metric] option") == 2
    assert browser.js(f"document.querySelector('{_section('ablate_mlp_out')} h2').textContent") == \
        "ablate_mlp_out: Δ logit_diff(io, s)"
    assert browser.errors() == []


def test_text_from_the_dataset_cannot_break_the_page(write_experiment, cpu_config, tmp_path, browser):
    ds = causal.run(write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=0..1] from corrupt into clean"),
                    cpu_config)
    ds.attrs["experiment_text"] += f"\n# {HOSTILE}\n"
    ds.attrs["experiment"] = f"tiny {HOSTILE}"
    tokens = ds["token_clean"].values.astype(object)
    tokens[:, 0] = HOSTILE
    ds = ds.assign_coords(token_clean=(ds["token_clean"].dims, tokens))
    _opened(browser, write_report(ds, tmp_path / "report.html"))
    assert browser.js("[document.body.classList.contains('pwned'), document.querySelectorAll('img').length]") == [False, 0]
    assert browser.js("document.getElementById('experiment-text').textContent") == ds.attrs["experiment_text"]
    assert browser.js("document.title") == f"causal: tiny {HOSTILE}"
    assert f'clean: {json.dumps(HOSTILE)}' in browser.hover(f"{_section('patch_resid_pre')} rect.cell")
    assert _count(browser, "rect.cell") == ds.sizes["layer"] * 2 and browser.errors() == []


def test_every_run_writes_the_report_and_causal_report_remakes_it(write_experiment, tmp_path, capsys, browser):
    path = write_experiment("metric logprob(io)\nablate z[layer=*, head=*] with zero")
    out = tmp_path / "run"
    assert main(["run", str(path), f"hydra.run.dir={out}", "device=cpu", "progress=false"]) == 0
    assert (out / "report.html").exists() and (out / "plots" / "ablate_z.png").exists()
    (out / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out == f"{out / 'report.html'}\n"
    _opened(browser, out / "report.html")
    assert _count(browser, "rect.cell") == 3 * 4
    assert "provenance" in browser.js("document.body.innerText").lower()

    bare = tmp_path / "bare"
    assert main(["run", str(path), f"hydra.run.dir={bare}", "device=cpu", "progress=false", "plots=false"]) == 0
    assert not (bare / "report.html").exists()  # like the plots, only with `plots` on


def test_report_of_a_sweep_has_a_selector_per_swept_parameter(write_experiment, tmp_path, browser):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with resample")
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", str(path), f"hydra.sweep.dir={sweep}", "seed=0,1", "device=cpu", "progress=false",
                 "plots=false"]) == 0
    assert main(["report", str(sweep)]) == 0
    _opened(browser, sweep / "report.html")
    assert browser.js("[...document.querySelectorAll('select[data-dim=seed] option')].map(o => o.value)") == ["0", "1"]
    assert _count(browser, "circle.point") == 3
    browser.js("(() => { const s = document.querySelector('select[data-dim=seed]'); s.value = '1';"
               " s.dispatchEvent(new Event('change')); })()")
    assert "seed 1" in browser.hover("circle.point") and browser.errors() == []


def test_the_page_s_numbers_are_the_summary_s(write_experiment, cpu_config, monkeypatch):
    ds = causal.run(write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with mean"), cpu_config)
    change = effect(ds, "ablate_mlp_out")
    shown = page_data(ds)["variables"][0]
    assert shown["interval"] == "bootstrap" and shown["n"] == [ds.sizes["example"]] * ds.sizes["layer"]
    assert np.allclose(shown["mean"], mean(change).values, rtol=1e-3, atol=1e-7)
    ci = bootstrap_ci(change, level=0.95)
    assert np.allclose(shown["low"], ci["low"].values, rtol=1e-3, atol=1e-7)
    assert np.allclose(shown["high"], ci["high"].values, rtol=1e-3, atol=1e-7)
    monkeypatch.setattr(report, "BOOTSTRAP_WORK", 0)  # a sweep too large to bootstrap: the normal interval
    shown = page_data(ds)["variables"][0]
    half = 1.959964 * standard_error(change).values
    assert shown["interval"] == "normal"
    assert np.allclose(shown["high"], mean(change).values + half, rtol=1e-3, atol=1e-7)


def test_report_errors_are_messages(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no results at" in capsys.readouterr().err
    assert main(["report", "-h"]) == 0 and "RUN_DIR" in capsys.readouterr().out


def test_a_trained_statement_lists_its_best_candidates(tmp_path, browser):
    """align: a section with the candidates ranked by held-out IIA (and their sizes), not 'no interventions'."""
    path = tmp_path / "x.cx"
    path.write_text('model "zoo:hiereq-gpt2"\ndata hiereq(n=160, seed=0)\nmetric accuracy(cf_wx) at -1\n'
                    "align resid_post[layer=0, pos=[1, 3]] from source into base predicting cf_wx "
                    "by lowrank(k=[1, 2], epochs=1) as wx\n")
    ds = causal.run(path, causal.RunConfig(progress=False))
    _opened(browser, write_report(ds, tmp_path / "report.html"))
    assert _count(browser, f"{_section('wx')} table.candidates tr") == 1 + 4
    assert browser.js(f"document.querySelector('{_section('wx')} h2').textContent") == "wx: held-out IIA"
    best = browser.js(f"document.querySelector('{_section('wx')} table.candidates tr:nth-of-type(2) td:nth-of-type(4)')"
                      ".textContent")
    assert float(best) == pytest.approx(float(ds["wx_iia"].max()), abs=5e-3)
    assert _count(browser, "p.note") == 0 and browser.errors() == []
