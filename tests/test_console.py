"""The web console in a real headless browser (Debian's chromium through chromium-driver) against a
real server while a client trains: sign-in by API key, the run's loss curve growing live, owners
kept apart, hostile metadata shown as text."""

from __future__ import annotations

import io
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_process import running_server

from tinker_client import ServiceClient, TrainingClient, types
from tinker_server.console.sessions import COOKIE

from .conftest import BASE_MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no chromium binary (or chromedriver): `make browser` installs Debian's chromium and chromium-driver",
)
SCREENSHOT_COPY = Path("/tmp/console_run_page.png")
HOSTILE = '<img src=x onerror="document.title=1"><script>document.title=2</script>'
# One next-token datum; the first two targets are the prompt's, weighted 0, so a loss per token
# divides by the weighted count (6), not the token count (8).
TOKENS = np.random.default_rng(3).integers(0, 256, size=9)
WEIGHTS = np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=np.float32)
DATUM = types.Datum(
    model_input=types.ModelInput.from_ints(TOKENS[:-1].tolist()),
    loss_fn_inputs={"target_tokens": TOKENS[1:].astype(np.int64), "weights": WEIGHTS},
)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir = tmp_path_factory.mktemp("console")
    keys = data_dir / "keys.txt"
    keys.write_text("alice-key alice\nbob-key bob\nroot-key root\n")
    arguments = ["--api-keys-file", str(keys), "--admin-owner", "root", "--console-port", "0"]
    with running_server(data_dir, arguments) as address:
        yield address


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def train(training: TrainingClient, steps: int) -> list[float]:
    """Takes `steps` optimizer steps; the loss per weighted token of each, as the client got it."""
    losses = []
    for _ in range(steps):
        backward = training.forward_backward([DATUM], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        losses.append(backward.result().metrics["loss:sum"] / WEIGHTS.sum())
    return losses


def submit_key(browser, api_key: str) -> None:
    """Fills in the sign-in form on the page, and waits for where it leads (or for its refusal)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    browser.find_element(By.ID, "api_key").send_keys(api_key)
    browser.find_element(By.ID, "sign-in").click()
    WebDriverWait(browser, 10, poll_frequency=0.1).until(
        lambda _: "/signin" not in browser.current_url or browser.find_elements(By.CSS_SELECTOR, "p.error")
    )


def sign_in(browser, console: str, api_key: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{console}/signin")
    submit_key(browser, api_key)


def points(browser, series: str) -> list[float]:
    """The values of a chart's points, read in one script (the chart is redrawn every 2 s)."""
    script = "return Array.from(document.querySelectorAll(arguments[0]), point => Number(point.dataset.value))"
    return browser.execute_script(script, f"#chart-{series} circle.point")


def wait_for_points(browser, series: str, count: int) -> list[float]:
    from selenium.webdriver.support.wait import WebDriverWait

    WebDriverWait(browser, 20, poll_frequency=0.2).until(lambda _: len(points(browser, series)) == count)
    return points(browser, series)


def test_an_owner_watches_their_runs_loss_curve_grow_and_fall_without_reloading(console_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    alice = ServiceClient(base_url=console_server, api_key="alice-key")
    training = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=0, user_metadata={"note": HOSTILE}).result()
    run_page = training.get_console_url()
    console = alice.get_console_url().removesuffix("/runs")
    assert run_page == f"{console}/runs/{training.model_id}"
    losses = train(training, 3)
    state = training.save_state("step-3", ttl_seconds=3600).result().path
    training.save_weights_and_get_sampling_client("step-3").result()

    browser.get(run_page)  # not signed in: the sign-in page, which comes back here after
    assert "/signin" in browser.current_url
    submit_key(browser, "alice-key")
    assert browser.current_url == run_page
    assert wait_for_points(browser, "loss_per_token", 3) == pytest.approx(losses, rel=1e-5)

    browser.execute_script("window.stillTheSamePage = true")
    losses += train(training, 3)
    shown = wait_for_points(browser, "loss_per_token", 6)
    assert browser.execute_script("return window.stillTheSamePage") is True  # updated in place, no reload
    assert shown == pytest.approx(losses, rel=1e-5)
    assert shown[-1] < shown[0]
    assert wait_for_points(browser, "learning_rate", 6) == pytest.approx([5e-3] * 6)
    assert points(browser, "tokens") == [8] * 6
    assert len(points(browser, "grad_norm")) == 6
    # The hostile metadata is text on the page, never markup that runs.
    assert browser.find_element(By.CSS_SELECTOR, "dd.metadata").text == HOSTILE
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    assert browser.title.endswith("tinker-server")
    checkpoints = browser.find_element(By.ID, "checkpoints").text
    assert state in checkpoints and "59m" in checkpoints  # its TTL
    assert "sampler_weights/step-3" in browser.find_element(By.ID, "samplers").text
    link = browser.find_element(By.CSS_SELECTOR, "#checkpoints a[download]").get_attribute("href")
    session = browser.get_cookie(COOKIE)["value"]
    with urllib.request.urlopen(urllib.request.Request(link, headers={"Cookie": f"{COOKIE}={session}"})) as download:
        archive = io.BytesIO(download.read())
    with tarfile.open(fileobj=archive) as tar:
        assert {"adapter_model.safetensors", "optimizer.safetensors"} <= set(tar.getnames())
    screenshot = tmp_path / "console_run_page.png"
    assert browser.save_screenshot(str(screenshot))
    shutil.copyfile(screenshot, SCREENSHOT_COPY)

    browser.get(f"{console}/runs")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-model-id="{training.model_id}"]')
    assert "6" in row.text and "resident" in row.text
    alice.close()


def test_another_owner_neither_lists_nor_opens_the_run_and_an_admin_sees_it_and_the_server(console_server, browser):
    from selenium.webdriver.common.by import By

    alice = ServiceClient(base_url=console_server, api_key="alice-key")
    training = alice.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    train(training, 1)
    console = alice.get_console_url().removesuffix("/runs")

    sign_in(browser, console, "bob-key")
    assert browser.current_url == f"{console}/runs"
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-model-id="{training.model_id}"]') == []
    browser.get(training.get_console_url())
    assert browser.find_element(By.TAG_NAME, "h1").text == "Not found"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{training.get_console_url()}/metrics.json")  # no session at all
    assert refused.value.code == 401

    sign_in(browser, console, "root-key")
    assert browser.find_elements(By.CSS_SELECTOR, f'tr[data-model-id="{training.model_id}"]') != []
    browser.get(f"{console}/server")
    assert "embedded/tiny-llama/0" in browser.find_element(By.CSS_SELECTOR, "table.replicas").text
    assert browser.find_elements(By.CSS_SELECTOR, "#cycles tbody tr") != []
    alice.close()


def test_a_wrong_key_is_refused(console_server, browser):
    from selenium.webdriver.common.by import By

    alice = ServiceClient(base_url=console_server, api_key="alice-key")
    console = alice.get_console_url().removesuffix("/runs")
    alice.close()
    sign_in(browser, console, "not-a-key")
    assert browser.find_element(By.CSS_SELECTOR, "p.error").text == "That API key is not valid here."
    assert browser.get_cookies() == []
    form = urllib.parse.urlencode({"api_key": "not-a-key"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{console}/signin", data=form)
    assert refused.value.code == 401
