"""The console in a real browser (Debian's headless Chromium through Selenium), on the real
service with a real PACS (Orthanc): a chest X-ray goes modality -> pacs-ai -> Orthanc and
the admin sees it with its summary image; Orthanc stops, a re-run's deliveries die, Orthanc
starts, the admin retries from the console and sees them delivered; a viewer sees no PHI; a
hostile PatientName stays text; /metrics agrees with the database.

Set PACS_AI_SCREENSHOTS=DIR to keep the page screenshots (the README's come from here).
"""

from __future__ import annotations

import http.cookiejar
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from pacs_ai.db.models import Delivery, DeliveryState, Finding, Study, StudyState, UserRole
from pacs_ai.service import Service
from pacs_ai.telemetry import CSTORE_SECONDS
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import cxr_phantom
from pacs_ai.web.users import add_user
from tests.conftest import free_port, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.orthanc import Orthanc
from tests.integration.test_e2e import storescu
from tests.tools import require_tool
from tests.webdata import seed_study

HOSTILE = dw.Patient(
    name="<script>alert(1)</script>^Mallory", patient_id="PHI-ID-4242", birth_date="19750505"
)
ACCESSION = "ACC-777"
ADMIN_PW = "admin password 1"
VIEWER_PW = "viewer password 1"

pytestmark = pytest.mark.slow


@pytest.fixture
def browser() -> Iterator[object]:
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1440,1000",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=ChromeService(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", {"pacsai": ("PACS_AI", 1)})
    pacs.start()
    yield pacs
    pacs.stop()


def _chest_dx() -> object:
    img = cxr_phantom("covid", np.random.default_rng(3), 512)
    study = dw.StudyInfo(accession_number=ACCESSION, description="CHEST PA")
    return dw.xray_image(200 + img * 3500, modality="DX", patient=HOSTILE, study=study)


class Page:
    """Thin helpers over the Selenium driver."""

    def __init__(self, driver: object, base: str) -> None:
        self.d = driver
        self.base = base

    def open(self, path: str) -> None:
        self.d.get(self.base + path)  # type: ignore[attr-defined]

    def css(self, selector: str) -> list[object]:
        from selenium.webdriver.common.by import By

        return list(self.d.find_elements(By.CSS_SELECTOR, selector))  # type: ignore[attr-defined]

    def text(self) -> str:
        """The visible text, lower-cased (some labels are upper-cased by CSS); "" while the
        page is being replaced (a form post's redirect), so polling callers just poll again."""
        from selenium.common.exceptions import StaleElementReferenceException

        try:
            return str(self.css("body")[0].text).lower()  # type: ignore[attr-defined]
        except (StaleElementReferenceException, IndexError):
            return ""

    def html(self) -> str:
        return str(self.d.page_source)  # type: ignore[attr-defined]

    def login(self, name: str, password: str) -> None:
        self.open("/login")
        self.css("#username")[0].send_keys(name)  # type: ignore[attr-defined]
        self.css("#password")[0].send_keys(password)  # type: ignore[attr-defined]
        self.css("#login")[0].click()  # type: ignore[attr-defined]
        wait_for(lambda: "/login" not in self.d.current_url, 10, "logged in")  # type: ignore[attr-defined]

    def logout(self) -> None:
        self.d.delete_all_cookies()  # type: ignore[attr-defined]

    def no_alert(self) -> bool:
        from selenium.common.exceptions import NoAlertPresentException

        try:
            self.d.switch_to.alert  # type: ignore[attr-defined]  # noqa: B018
        except NoAlertPresentException:
            return True
        return False

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / f"console-{name}.png"
        self.d.save_screenshot(str(path))  # type: ignore[attr-defined]
        # screenshots for the README stay small: 256-colour PNG
        img = Image.open(path).convert("RGB")
        img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        return path


def _http(url: str, data: dict[str, str] | None = None, cookie: str | None = None) -> int:
    req = urllib.request.Request(  # noqa: S310 - loopback http only
        url, data=urllib.parse.urlencode(data).encode() if data is not None else None
    )
    if cookie:
        req.add_header("Cookie", cookie)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(
        NoRedirect, urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )
    try:
        with opener.open(req, timeout=10) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _a_day_of_studies(svc: Service) -> None:
    rng = np.random.default_rng(7)
    names = ["Doe^Jane", "Roe^Richard", "Smith^Anna", "Garcia^Luis", "Chen^Wei", "Okafor^Ada"]
    for n in range(100, 160):
        seed_study(
            svc.engine,
            n=n,
            state=StudyState.DELIVERED if n % 17 else StudyState.REPORTED,
            patient_id=f"PID{40000 + n * 37}",
            accession=f"A{7700 + n}",
            delivery_state=DeliveryState.DELIVERED if n % 17 else DeliveryState.DEAD,
            present=bool(rng.random() < 0.3),
            patient_name=names[n % len(names)],
            minutes_ago=float(rng.uniform(5, 23 * 60)),
            modality="CT" if n % 4 == 0 else "DX",
        )


def _state_of_deliveries(svc: Service, uid: str) -> list[DeliveryState]:
    with svc.engine.connect() as c:
        return list(
            c.scalars(
                select(Delivery.state)
                .join(Study, Study.id == Delivery.study_id)
                .where(Study.study_uid == uid)
                .order_by(Delivery.id)
            )
        )


def test_console_in_a_real_browser(
    start_service: ServiceFactory, orthanc: Orthanc, browser: object, tmp_path: Path
) -> None:
    http_port = free_port()
    svc = start_service(
        None,
        pipeline={"enabled": True, "poll_seconds": 0.5},
        destinations=[
            {
                "name": "orthanc",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "objects": ["sr", "summary"],
                "timeout_seconds": 5,
            }
        ],
        # one attempt: a failure is dead at once, for an admin to retry
        delivery={"retry_ladder_seconds": [0.5], "poll_seconds": 0.3, "max_attempts": 1},
        http={"enabled": True, "port": http_port},
    )
    add_user(svc.engine, "alice", UserRole.ADMIN, ADMIN_PW)
    add_user(svc.engine, "victor", UserRole.VIEWER, VIEWER_PW)
    base = f"http://127.0.0.1:{http_port}"
    shots = tmp_path / "shots"
    shots.mkdir()

    dx = _chest_dx()
    uid = dx.StudyInstanceUID  # type: ignore[attr-defined]
    # The C-STORE histogram is per process (the listener's): earlier tests in this process
    # count too, so this test checks what its own store added.
    stores_before = _cstore_successes()
    storescu(svc, write_all([dx], tmp_path / "dx"))  # type: ignore[list-item]
    wait_for(
        lambda: _state_of_deliveries(svc, uid) == [DeliveryState.DELIVERED] * 2,
        90,
        "delivered to Orthanc",
    )
    with svc.engine.connect() as c:
        study_id = c.scalar(select(Study.id).where(Study.study_uid == uid))

    # anonymous: pages redirect to the login, actions are refused
    assert _http(f"{base}/studies") == 302
    assert _http(f"{base}/studies/{study_id}/rerun", {"csrf": "x"}) == 401
    assert _http(f"{base}/healthz") == 200

    page = Page(browser, base)
    page.login("alice", ADMIN_PW)
    page.open("/")
    wait_for(lambda: len(page.css("#chart-throughput canvas")) == 1, 10, "chart drawn")
    assert "listener" in page.text() and "instances stored" in page.text()
    page.shot(shots, "overview")

    page.open("/studies")
    assert uid[:12].lower() in page.text()
    page.shot(shots, "studies")
    page.css(f'a[href="/studies/{study_id}"]')[0].click()  # type: ignore[attr-defined]
    wait_for(lambda: page.css("#summary-image"), 10, "study page")
    img = page.css("#summary-image")[0]
    wait_for(
        lambda: browser.execute_script(  # type: ignore[attr-defined]
            "return arguments[0].complete && arguments[0].naturalWidth", img
        ),
        10,
        "image loaded",
    )
    assert browser.execute_script("return arguments[0].naturalWidth", img) > 500  # type: ignore[attr-defined]
    # the hostile name is shown as text, and nothing ran
    assert page.css("#patient-name")[0].text == HOSTILE.name  # type: ignore[attr-defined]
    assert page.no_alert()
    assert "Finding" in page.css("#sr-tree")[0].text  # type: ignore[attr-defined]
    page.shot(shots, "study")

    # Orthanc goes away; a re-run from the console makes new reports whose deliveries die
    orthanc.stop()
    page.css("#rerun")[0].click()  # type: ignore[attr-defined]
    wait_for(lambda: "re-run queued" in page.text(), 10, "re-run flash")
    wait_for(
        lambda: _state_of_deliveries(svc, uid).count(DeliveryState.DEAD) == 2,
        90,
        "deliveries of the re-run dead",
    )

    def dead_shown() -> bool:
        page.open(f"/studies/{study_id}")
        return len(page.css("button.retry")) == 2

    wait_for(dead_shown, 20, "dead deliveries on the study page")
    orthanc.start()
    for _ in range(2):
        page.css("button.retry")[0].click()  # type: ignore[attr-defined]
        wait_for(lambda: "re-queued" in page.text(), 10, "retry flash")

    def delivered_shown() -> bool:
        page.open(f"/studies/{study_id}")
        return page.text().count("delivered") >= 4 and not page.css("button.retry")

    wait_for(delivered_shown, 60, "all delivered on the study page")
    assert _state_of_deliveries(svc, uid) == [DeliveryState.DELIVERED] * 4
    assert len(orthanc.find_instances(uid)) == 4  # SR + summary of revisions 0 and 1

    # a POST with the admin's session cookie but no CSRF token
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())  # type: ignore[attr-defined]
    assert _http(f"{base}/studies/{study_id}/rerun", {}, cookie) == 403

    page.open("/models")
    page.shot(shots, "models")

    # the viewer sees the study and its results, never PHI
    page.logout()
    page.login("victor", VIEWER_PW)
    for path in ("/studies", f"/studies/{study_id}", "/"):
        page.open(path)
        html = page.html()
        for phi in ("alert(1)", HOSTILE.patient_id, ACCESSION, HOSTILE.birth_date):
            assert phi not in html, (path, phi)
    page.open(f"/studies/{study_id}")
    assert uid in page.text() and not page.css("#rerun")

    # /metrics agrees with the database
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as rsp:  # noqa: S310 - loopback
        families = {f.name: f for f in text_string_to_metric_families(rsp.read().decode())}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    with svc.engine.connect() as c:
        delivered = c.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.state == DeliveryState.DELIVERED)
        )
        findings = c.scalar(select(func.count()).select_from(Finding))
        state = c.scalar(select(Study.state).where(Study.id == study_id))
    assert samples[("pacs_ai_deliveries", (("state", "delivered"),))] == delivered == 4
    assert sum(v for (n, _), v in samples.items() if n == "pacs_ai_findings_total") == findings
    assert samples[("pacs_ai_studies", (("state", state.value),))] == 1
    assert state == StudyState.DELIVERED
    assert samples[("pacs_ai_instances_received_total", (("outcome", "stored"),))] == 1
    cstores = samples[("pacs_ai_cstore_handling_seconds_count", (("outcome", "success"),))]
    assert cstores - stores_before == 1

    for shot in shots.iterdir():
        assert shot.stat().st_size < 300_000, shot
    keep = os.environ.get("PACS_AI_SCREENSHOTS")
    if keep:  # for the README: the overview and list again, with a day of made-up traffic
        _a_day_of_studies(svc)
        page.logout()
        page.login("alice", ADMIN_PW)
        page.open("/")
        page.shot(shots, "overview")
        page.open("/studies")
        page.shot(shots, "studies")
        for shot in shots.iterdir():
            shutil.copy(shot, Path(keep) / shot.name)


def _cstore_successes() -> float:
    return next(
        (
            s.value
            for m in CSTORE_SECONDS.collect()
            for s in m.samples
            if s.name.endswith("_count") and s.labels == {"outcome": "success"}
        ),
        0.0,  # no successful C-STORE in this process yet
    )
