"""The web console (`/console`, service/console.py) on the shared server: a real headless
chromium (Debian's `chromium`, driven over the DevTools protocol with aiohttp's websocket client)
signs in with alice's key, opens her run and finds its loss curve drawn with one point per
step, publishes a checkpoint through the page's confirmation, fetches an export's download link,
lists her checkpoints and sessions, and never shows bob's; an administrator's key sees the
operator view. The JSON routes are checked without a browser too: the history holds exactly
the losses the client saw, another user's run is not found, the operator view is refused to a
key that is not an administrator's. Screenshots go to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.server_process import ServerProcess
from tests.sft_data import sft_data

tinker = pytest.importorskip("tinker")
httpx = pytest.importorskip("httpx")
aiohttp = pytest.importorskip("aiohttp")
from tinker import types as T  # noqa: E402

from tinker_jax.service import store as store_module  # noqa: E402
from tinker_jax.service.store import DB_NAME, Store  # noqa: E402

TIMEOUT = 300
STEPS = 3  # alice's forward_backward + optim_step pairs
LENGTHS = [12, 9]
BROWSER_TIMEOUT = 60.0  # seconds the browser may take to show what a step waits for


@dataclasses.dataclass
class Trained:
    """What the module's users did: alice's run, the losses and optimizer metrics her client
    saw, her checkpoints and session; bob's run and session."""

    alice_run: str
    alice_session: str
    losses: list[float]
    optim_metrics: list[dict[str, float]]
    eval_loss: float
    state_path: str
    export_path: str
    bob_run: str
    bob_session: str
    admin_key: str


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("console", "alice", "bob")


def _headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def trained(server) -> Trained:
    alice = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    training = alice.create_lora_training_client(server.model, rank=4, seed=1).result()
    losses, optim_metrics = [], []
    batch = sft_data(0, LENGTHS, types=T)  # the same batch each step: the loss falls
    for _ in range(STEPS):
        result = training.forward_backward(batch, "cross_entropy").result(timeout=TIMEOUT)
        losses.append(result.metrics["loss:sum"])
        step_result = training.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
        optim_metrics.append(dict(step_result.metrics))
    evaluated = training.forward(batch, "cross_entropy").result(timeout=TIMEOUT)
    state_path = training.save_state("console-state").result(timeout=TIMEOUT).path
    training.save_weights_and_get_sampling_client().result(timeout=TIMEOUT)  # a sampler
    export_path = training.save_weights_external("console-export").result(timeout=TIMEOUT).path
    # Published: another user may load it, but still not read the run's history.
    run_id, _, export_id = export_path.removeprefix("tinker://").partition("/")
    published = httpx.post(
        f"{server.http_url}/api/v1/training_runs/{run_id}/checkpoints/{export_id}/publish",
        headers=_headers(server.keys["alice"]),
        timeout=60,
    )
    assert published.status_code == 200, published.text

    bob = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["bob"])
    bob_training = bob.create_lora_training_client(server.model, rank=4, seed=2).result()
    bob_training.forward_backward(sft_data(9, LENGTHS, types=T), "cross_entropy").result(
        timeout=TIMEOUT
    )
    admin = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_jax.service.cli",
            "keys",
            "create",
            "console-admin",
            "--admin",
            "--storage",
            str(server.storage),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return Trained(
        alice_run=training.model_id,
        alice_session=training.model_id.split(":")[0],
        losses=losses,
        optim_metrics=optim_metrics,
        eval_loss=evaluated.metrics["loss:sum"],
        state_path=state_path,
        export_path=export_path,
        bob_run=bob_training.model_id,
        bob_session=bob_training.model_id.split(":")[0],
        admin_key=admin.stdout.strip().splitlines()[-1],
    )


def _get(server, path: str, key: str | None) -> httpx.Response:
    return httpx.get(server.http_url + path, headers=_headers(key) if key else {}, timeout=60)


# ---------------------------------------------------------------- JSON routes, no browser


def test_history_holds_what_the_client_saw(server, trained):
    answer = _get(
        server, f"/api/v1/training_runs/{trained.alice_run}/metric_history", server.keys["alice"]
    )
    assert answer.status_code == 200, answer.text
    history = answer.json()
    assert history["max_points"] == store_module.MAX_METRIC_POINTS
    points = history["points"]
    assert [p["kind"] for p in points] == ["forward_backward", "optim_step"] * STEPS + ["forward"]
    assert [p["step"] for p in points] == [s for s in range(STEPS) for _ in range(2)] + [STEPS]
    assert [p["seq"] for p in points] == list(range(2 * STEPS + 1))
    assert [p["metrics"]["loss:sum"] for p in points[:-1:2]] == trained.losses
    assert [p["metrics"] for p in points[1::2]] == trained.optim_metrics
    assert points[-1]["metrics"]["loss:sum"] == trained.eval_loss
    assert trained.eval_loss < trained.losses[0]  # the steps trained on this batch
    # Bob's run has its own history, one point.
    bob = _get(
        server, f"/api/v1/training_runs/{trained.bob_run}/metric_history", server.keys["bob"]
    )
    assert [p["kind"] for p in bob.json()["points"]] == ["forward_backward"]


def test_another_users_run_history_is_not_found(server, trained):
    for run, key in ((trained.alice_run, "bob"), (trained.bob_run, "alice")):
        answer = _get(server, f"/api/v1/training_runs/{run}/metric_history", server.keys[key])
        assert answer.status_code == 404, answer.text
        assert run in answer.json()["detail"]
    assert (
        _get(server, f"/api/v1/training_runs/{trained.alice_run}/metric_history", None).status_code
        == 401
    )


def test_operator_load_is_for_administrators(server, trained):
    refused = _get(server, "/api/v1/console/load", server.keys["alice"])
    assert refused.status_code == 403, refused.text
    assert "admin" in refused.json()["detail"]
    assert _get(server, "/api/v1/console/load", None).status_code == 401
    # A key is taken from the headers only, never from the address.
    in_query = httpx.get(
        f"{server.http_url}/api/v1/console/load",
        params={"api_key": trained.admin_key, "x-api-key": trained.admin_key},
        timeout=60,
    )
    assert in_query.status_code == 401
    load = _get(server, "/api/v1/console/load", trained.admin_key)
    assert load.status_code == 200, load.text
    model = load.json()["models"][server.model]
    assert model["operations"]["optim_step"]["finished"] >= STEPS
    assert model["queues"]["forward_backward"] >= 0
    assert model["trained_tokens"] >= STEPS * sum(LENGTHS)
    assert load.json()["process_rss_bytes"] > 0
    listing = subprocess.run(
        [sys.executable, "-m", "tinker_jax.service.cli", "keys", "list", "--storage"]
        + [str(server.storage)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    flagged = {line.split()[0] for line in listing if line.endswith("  admin")}
    assert "console-admin" in flagged and server.users["alice"] not in flagged


def test_the_page_is_served_with_its_files_and_no_secrets(server):
    page = _get(server, "/console", None)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert '<script src="/console/static/console.js"' in page.text
    script = _get(server, "/console/static/console.js", None)
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert _get(server, "/console/static/console.css", None).status_code == 200
    assert _get(server, "/console/static/..%2Fconsole.py", None).status_code == 404
    assert _get(server, "/console/static/secret.txt", None).status_code == 404


# ---------------------------------------------------------------- store


def test_history_keeps_the_newest_points_and_steps_on(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MAX_METRIC_POINTS", 3)
    store = Store(tmp_path)
    kinds = ["forward_backward", "optim_step", "forward", "forward_backward", "optim_step"]
    for i, kind in enumerate(kinds):
        store.add_metric_point("run-a", kind, {"loss:sum": float(i)}, now=100.0 + i)
    store.add_metric_point("run-b", "forward_backward", {"loss:sum": float("nan")})
    points = store.metric_points("run-a")
    assert [(p.seq, p.step, p.kind) for p in points] == [
        (2, 1, "forward"),
        (3, 1, "forward_backward"),
        (4, 1, "optim_step"),
    ]
    assert [p.metrics["loss:sum"] for p in points] == [2.0, 3.0, 4.0]
    store.close()
    reopened = Store(tmp_path)
    assert [p.seq for p in reopened.metric_points("run-a")] == [2, 3, 4]
    (nan_point,) = reopened.metric_points("run-b")
    assert nan_point.metrics["loss:sum"] != nan_point.metrics["loss:sum"]  # NaN kept as NaN
    reopened.close()


def test_an_older_database_gains_the_admin_flag(tmp_path):
    store = Store(tmp_path)
    _, key = store.create_user("old")
    _, admin_key = store.create_user("boss", admin=True)
    store.close()
    # Back to version 4's api_keys table, as an older tinker-jax left it.
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("ALTER TABLE api_keys DROP COLUMN admin")
    conn.execute("UPDATE schema_version SET version = 4")
    conn.commit()
    conn.close()
    store = Store(tmp_path)
    assert store.authenticate(key) is not None
    assert not store.is_admin_key(key) and not store.is_admin_key(admin_key)
    assert [k.admin for k in store.list_keys()] == [False, False]
    _, new_admin = store.create_user("boss2", admin=True)
    assert store.is_admin_key(new_admin)
    store.revoke_keys("boss2")
    assert not store.is_admin_key(new_admin)
    store.close()


# ---------------------------------------------------------------- the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Page:
    """One browser tab over the DevTools protocol: commands answered in order of their ids,
    events kept (`events`) for the checks at the end."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                self._pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params) -> dict:
        self._next += 1
        answer = asyncio.get_running_loop().create_future()
        self._pending[self._next] = answer
        await self.ws.send_json({"id": self._next, "method": method, "params": params})
        reply = await asyncio.wait_for(answer, BROWSER_TIMEOUT)
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply["result"]

    async def eval(self, expression: str):
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str):
        """The first truthy value of `expression`, polled; fails after BROWSER_TIMEOUT,
        showing the page's text."""
        deadline = time.monotonic() + BROWSER_TIMEOUT
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = await self.eval("document.body.innerText")
                raise AssertionError(f"the page never showed {expression}; it shows:\n{text}")
            await asyncio.sleep(0.1)

    async def click(self, selector: str) -> None:
        await self.wait_for(f"document.querySelector({json.dumps(selector)}) !== null")
        await self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    async def open(self, hash: str, view: str) -> None:
        """Goes to `hash` and waits for `view` (the page names the view it shows)."""
        await self.eval(f"location.hash = {json.dumps(hash)}")
        await self.wait_for(f"document.querySelector('#main').dataset.view === {json.dumps(view)}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    async def sign_in(self, key: str) -> None:
        await self.wait_for("document.querySelector('#sign-in') !== null")
        await self.eval(
            f"document.querySelector('#api-key').value = {json.dumps(key)};"
            "document.querySelector('#sign-in').requestSubmit()"
        )
        await self.wait_for("!document.querySelector('#nav').hidden")


def _launch(binary: str, profile: Path) -> tuple[subprocess.Popen, int]:
    """Headless chromium with remote debugging on a free port, and that port (chromium writes
    it to DevToolsActivePort in the profile folder once it listens)."""
    proc = subprocess.Popen(
        [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in a container: the sandbox needs namespaces it lacks
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1280,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + BROWSER_TIMEOUT
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"chromium did not start (exit status {proc.poll()})")
        time.sleep(0.1)
    return proc, int(port_file.read_text().split()[0])


def test_the_console_in_a_browser(server, trained, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (.ci/run installs Debian's chromium package)")
    proc, port = _launch(binary, tmp_path / "profile")
    try:
        asyncio.run(_browse(server, trained, port, tmp_path))
    finally:
        proc.kill()
        proc.wait(timeout=30)
    shots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert shots == [
        "1-runs.png",
        "2-run.png",
        "3-confirm.png",
        "4-checkpoints.png",
        "5-sessions.png",
        "6-operator.png",
    ]


async def _browse(server, trained: Trained, port: int, shots: Path) -> None:
    alice_key = server.keys["alice"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
            targets = await answer.json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with http.ws_connect(url, max_msg_size=0) as ws:
            page = _Page(ws)
            for domain in ("Page", "Runtime", "Network"):
                await page.send(f"{domain}.enable")
            await page.send("Page.navigate", url=server.http_url + "/console")
            await page.sign_in(alice_key)

            # Runs: alice's one run, bob's nowhere.
            runs = await page.wait_for(
                "[...document.querySelectorAll('#runs a.run-link')].map(a => a.textContent)"
            )
            assert runs == [trained.alice_run]
            html = "document.documentElement.outerHTML"
            assert trained.bob_run not in await page.eval(html)
            where = await page.eval("[location.href, document.cookie, localStorage.length]")
            assert where == [f"{server.http_url}/console#/runs", "", 0]
            assert await page.eval("sessionStorage.getItem('tinker-jax-api-key')") == alice_key
            assert await page.eval("document.querySelector('#operator-link').hidden")
            await page.screenshot(shots / "1-runs.png")

            # Her run: the loss curve has one point per step, in the order of the losses.
            await page.click("#runs a.run-link")
            chart = "svg.chart[data-kind='forward_backward'][data-metric='loss:sum']"
            d = await page.wait_for(
                f"document.querySelector(\"{chart} path.line\")?.getAttribute('d')"
            )
            commands = d.split()
            assert [c[0] for c in commands[::2]] == ["M"] + ["L"] * (STEPS - 1)
            ys = [float(y) for y in commands[1::2]]
            order = sorted(range(STEPS), key=lambda i: -trained.losses[i])
            assert sorted(range(STEPS), key=lambda i: ys[i]) == order  # higher loss, higher up
            assert await page.eval(f'document.querySelector("{chart}").dataset.points') == str(
                STEPS
            )
            optim = "svg.chart[data-kind='optim_step'] path.line"
            optim_d = await page.eval(f"document.querySelector(\"{optim}\").getAttribute('d')")
            assert len(optim_d.split()) == 2 * STEPS
            await page.screenshot(shots / "2-run.png")

            # Publishing asks first, inside the page; the checkpoint is public once confirmed.
            row = f"tr[data-path='{trained.state_path}']"
            await page.click(f"{row} .action-publish")
            await page.wait_for(f'document.querySelector("{row} .confirm-yes") !== null')
            await page.screenshot(shots / "3-confirm.png")
            await page.click(f"{row} .confirm-yes")
            await page.wait_for(f"document.querySelector(\"{row} .public\")?.textContent === 'yes'")
            # A TTL set in the page is the checkpoint's expiry.
            await page.eval(
                f'document.querySelector("{row} .ttl-input").value = "7200";'
                f'document.querySelector("{row} .action-ttl").click()'
            )
            await page.wait_for(
                f'document.querySelector("{row} .expires")?.textContent === "in 2 h"'
            )
            listing = _get(
                server, f"/api/v1/training_runs/{trained.alice_run}/checkpoints", alice_key
            ).json()["checkpoints"]
            public = {c["tinker_path"]: c["public"] for c in listing}
            assert public == {trained.state_path: True, trained.export_path: True}
            expiring = {c["tinker_path"] for c in listing if c.get("expires_at")}
            assert expiring == {trained.state_path}

            # The export's files download from signed links (no key in them).
            export = f"tr[data-path='{trained.export_path}']"
            await page.click(f"{export} .action-download")
            links = await page.wait_for(
                f'[...document.querySelectorAll("{export} .downloads a")].map(a => a.href)'
            )
            files = {link.split("?")[0].rsplit("/", 1)[-1] for link in links}
            assert "adapter_model.safetensors" in files, links
            downloaded = httpx.get(links[0], timeout=60)
            assert downloaded.status_code == 200 and len(downloaded.content) > 0

            # Every checkpoint of hers, none of bob's.
            await page.open("#/checkpoints", "checkpoints")
            paths = await page.wait_for(
                "[...document.querySelectorAll('table.checkpoints tr[data-path]')]"
                ".map(r => r.dataset.path)"
            )
            assert sorted(paths) == sorted([trained.state_path, trained.export_path])
            assert trained.bob_run not in await page.eval(html)
            # Deleting asks first too; the export is gone once confirmed.
            await page.click(f"{export} .action-delete")
            await page.click(f"{export} .confirm-yes")
            await page.wait_for(f'document.querySelector("{export}") === null')
            listing = _get(server, "/api/v1/checkpoints", alice_key).json()["checkpoints"]
            assert [c["tinker_path"] for c in listing] == [trained.state_path]
            await page.screenshot(shots / "4-checkpoints.png")

            # Her session with its run; bob's session nowhere.
            await page.open("#/sessions", "sessions")
            sessions = await page.wait_for(
                "[...document.querySelectorAll('#sessions tr[data-session]')]"
                ".map(r => r.dataset.session)"
            )
            assert sessions == [trained.alice_session]
            session = _get(server, f"/api/v1/sessions/{trained.alice_session}", alice_key).json()
            assert len(session["sampler_ids"]) == 1
            shown = await page.eval(
                "[...document.querySelectorAll('#sessions tr[data-session] .sampler')]"
                ".map(s => s.dataset.sampler)"
            )
            assert shown == session["sampler_ids"]
            assert trained.alice_run in await page.eval("document.body.innerText")
            assert trained.bob_session not in await page.eval(html)
            await page.screenshot(shots / "5-sessions.png")

            # The operator view is not hers; an administrator's key opens it.
            await page.eval("location.hash = '#/operator'")
            await page.wait_for("location.hash === '#/runs'")
            await page.click("#sign-out")
            await page.sign_in(trained.admin_key)
            await page.wait_for("!document.querySelector('#operator-link').hidden")
            await page.open("#/operator", "operator")
            queued = await page.wait_for(
                f"[...document.querySelectorAll(\"section.model[data-model='{server.model}']"
                ' tr[data-operation]")].map(r => r.dataset.operation)'
            )
            assert "forward_backward" in queued and "optim_step" in queued
            await page.screenshot(shots / "6-operator.png")

            # No script failed, and no request carried a key in its address.
            errors = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"]
            assert errors == []
            sent = [
                e["params"]["request"]
                for e in page.events
                if e["method"] == "Network.requestWillBeSent"
            ]
            api_calls = [r for r in sent if "/api/v1/" in r["url"]]
            assert len(api_calls) > 10
            for request in sent:
                assert alice_key not in request["url"] and trained.admin_key not in request["url"]
            assert all(r["headers"].get("X-API-Key") for r in api_calls)
