"""
The page in a real browser: Debian's ``chromium``, driven by Selenium through
Debian's ``chromium-driver`` (``.ci/run`` installs both; nothing is
downloaded at run time), against a server of this process on the real
Redis and MariaDB, with a token.

The page loads and asks for the token (and again after a wrong one); the last events are shown and a
filter works; a stream is shown in version order with ``data``
pretty-printed; the live tail shows an event persisted through the real
server within a second of its persist's answer (and not one its filter
leaves out); the server view draws its throughput chart.  Every request the
page made to ``/api`` carried the token in its ``Authorization`` header,
none in its URL.

A screenshot of each view is written to ``page-screenshots`` in trial's
temporary folder (``.tox/slow/tmp/_trial_temp/page-screenshots`` under tox;
the test logs where), and also to ``$EVENTSOURCE_SCREENSHOTS`` when that is set: the
README's pictures in ``docs/images`` are these, made with
``EVENTSOURCE_SCREENSHOTS=docs/images tox -e slow -- tests/slow/test_page_browser.py``.
"""

import json
import os
import shutil
import time

from twisted.internet import defer, threads
from twisted.logger import Logger

from tests.support import IntegrationTestCase, sleep, unique

log = Logger()

TOKEN = "browser-test-token-Yt5_Rk2-page"

#: the checkout this test is in
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: the browser's window, as the screenshots show it
WINDOW = (1280, 1000)

#: events written in each of the throughput samples the test takes (the chart's bars)
WAVES = [(7 * k) % 13 + 2 for k in range(36)]

#: the events persisted before the page is opened: (pid, domain, name, data)
EVENTS = [
    ("order-1001", "order", "created", {"customer": "c-17", "items": [
        {"sku": "BOOK-42", "quantity": 1, "price": 12.5},
        {"sku": "PEN-7", "quantity": 3, "price": 1.2}], "currency": "EUR"}),
    ("user-17", "user", "registered", {"email": "ada@example.org", "plan": "pro"}),
    ("order-1001", "order", "paid", {"amount": 16.1, "method": "card"}),
    ("order-1002", "order", "created", {"customer": "c-4", "items": [
        {"sku": "MUG-1", "quantity": 2, "price": 8}], "currency": "EUR"}),
    ("order-1001", "order", "shipped", {"carrier": "DHL", "tracking": "JD0142"}),
    ("user-17", "user", "renamed", {"to": "Ada L."}),
    ("order-1002", "order", "cancelled", {"reason": "customer asked"}),
]


class PageBrowserTests(IntegrationTestCase):
    timeout = 240
    # (a fetch left waiting shows in the server view: no row timeout meanwhile)
    server_config = {"http_port": 0, "http_token": TOKEN, "row_timeout": 120}

    @defer.inlineCallbacks
    def setUp(self):
        self.chromium = shutil.which("chromium")
        self.chromedriver = shutil.which("chromedriver")
        if not (self.chromium and self.chromedriver):
            self.fail("needs Debian's chromium and chromium-driver: .ci/run installs them with "
                      "apt-get")
        try:
            import selenium  # noqa: F401
        except ImportError:
            self.fail("needs selenium (tox -e slow installs it)")
        yield super().setUp()
        http = self.server.getServiceNamed("http")
        self.base = f"http://127.0.0.1:{http.port}/"
        self.page = http.page
        self.requests = []
        site = http.site
        real = site.getResourceFor

        def recorded(request):
            self.requests.append((request.method.decode(), request.uri.decode("latin-1"),
                                  request.getHeader(b"authorization")))
            return real(request)

        self.patch(site, "getResourceFor", recorded)
        # (trial runs in its temporary folder: _trial_temp, under .tox with tox)
        self.folder = os.path.abspath("page-screenshots")
        os.makedirs(self.folder, exist_ok=True)
        log.info("the page's screenshots: {folder}", folder=self.folder)
        self.driver = yield threads.deferToThread(self._start_browser)
        self.addCleanup(threads.deferToThread, self.driver.quit)

    def _start_browser(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = self.chromium
        for argument in ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--hide-scrollbars",
                         "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}"]:
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        return webdriver.Chrome(service=Service(self.chromedriver), options=options)

    # -- the browser, from the reactor's side ----------------------------------

    def browser(self, work, *args):
        """Run ``work(driver, *args)`` in a thread (Selenium blocks; the server runs here)."""
        return threads.deferToThread(work, self.driver, *args)

    def wait(self, condition, timeout=20, what="the page"):
        """Fire once ``condition(driver)`` is true, polled in the browser's thread."""
        def waited(driver):
            from selenium.webdriver.support.ui import WebDriverWait

            return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
                condition, message=f"waiting for {what}")
        return self.browser(waited)

    def screenshot(self, name):
        def take(driver):
            path = os.path.join(self.folder, name)
            driver.save_screenshot(path)
            wanted = os.environ.get("EVENTSOURCE_SCREENSHOTS")
            if wanted:
                # (relative to the checkout: trial runs in its temporary folder)
                wanted = os.path.join(CHECKOUT, wanted)
                os.makedirs(wanted, exist_ok=True)
                shutil.copy(path, os.path.join(wanted, name))
            return path
        return self.browser(take)

    @staticmethod
    def texts(driver, selector):
        """The text of each element ``selector`` finds, read at one moment (no stale element)."""
        return driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), (e) => e.innerText)",
            selector)

    @staticmethod
    def fill(driver, form, values, submit=True):
        from selenium.webdriver.common.by import By

        for name, value in values.items():
            field = driver.find_element(By.CSS_SELECTOR, f"#{form} [name={name}]")
            field.clear()
            if value:
                field.send_keys(value)
        if submit:
            driver.find_element(By.CSS_SELECTOR, f"#{form} button[type=submit]").click()

    @defer.inlineCallbacks
    def persist(self, pid, domain, name, data):
        reply = yield self.client.persist([{"pid": pid, "domain": domain, "name": name,
                                            "data": data}])
        self.assertEqual(reply[0]["affectedRows"], 1, reply)
        return reply[0]["insertId"]

    # -- the test ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_the_page(self):
        # a chart with a few samples to draw: traffic in waves, a sample after each
        for k, wave in enumerate(WAVES):
            yield self.client.persist([{"pid": f"load-{k}-{i}", "domain": "load",
                                        "name": "tick", "data": {"i": i}} for i in range(wave)])
            yield self.client.fetch({"$where": {"domain": "load"}, "$limit": 2 * wave},
                                    window=50)
            self.page.throughput.sample()
        for event in EVENTS:
            yield self.persist(*event)
        first_api = len(self.requests)

        # the page asks for the token, once
        yield self.browser(lambda driver: driver.get(self.base))
        yield self.wait(lambda driver: driver.find_element("id", "login").is_displayed(),
                        what="the token form")
        yield self.screenshot("page-token.png")
        self.assertTrue(all(auth is None for _, _, auth in self.requests[first_api:]))
        # a wrong token is refused, and the page asks again
        yield self.browser(lambda driver: self.fill(driver, "login-form",
                                                    {"token": "not-" + TOKEN}))
        yield self.wait(lambda driver: driver.find_element("id", "error").text
                        == "The server refused that token.", what="the refusal")
        self.assertTrue((yield self.browser(
            lambda driver: driver.find_element("id", "login").is_displayed())))
        before_login = len(self.requests)
        yield self.browser(lambda driver: self.fill(driver, "login-form", {"token": TOKEN}))

        # the last events, newest first
        yield self.wait(lambda driver: len(self.texts(driver, "#events-table tbody tr")) >= 10,
                        what="the last events")
        pids = yield self.browser(self.texts, "#events-table tbody td:nth-child(3)")
        self.assertEqual(pids[:len(EVENTS)], [pid for pid, _, _, _ in reversed(EVENTS)])

        # a filter: the pid
        yield self.browser(lambda driver: self.fill(driver, "events-form", {"pid": "order-1001"}))
        yield self.wait(lambda driver: set(self.texts(driver, "#events-table tbody td:nth-child(3)"))
                        == {"order-1001"}, what="the filtered events")
        names = yield self.browser(self.texts, "#events-table tbody td:nth-child(6)")
        self.assertEqual(names, ["shipped", "paid", "created"])
        yield self.browser(lambda driver: self.fill(driver, "events-form",
                                                    {"pid": "", "domain": "order",
                                                     "name": "created"}))
        yield self.wait(lambda driver: self.texts(driver, "#events-table tbody td:nth-child(3)")
                        == ["order-1002", "order-1001"], what="domain and name filtered")
        yield self.browser(lambda driver: self.fill(driver, "events-form",
                                                    {"domain": "", "name": ""}))
        yield self.wait(lambda driver: len(self.texts(driver, "#events-table tbody tr")) >= 10)
        yield self.screenshot("page-events.png")

        # one stream, from a click on its pid
        def open_stream(driver):
            from selenium.webdriver.common.by import By

            driver.find_element(By.LINK_TEXT, "order-1001").click()

        yield self.browser(open_stream)
        yield self.wait(lambda driver: len(self.texts(driver, "#stream-events li")) == 3,
                        what="the stream's events")
        heads = yield self.browser(self.texts, "#stream-events .card-head strong")
        self.assertEqual(heads, ["v0", "v1", "v2"])
        data = yield self.browser(self.texts, "#stream-events pre")
        self.assertEqual(json.loads(data[0]), EVENTS[0][3])
        self.assertIn('\n  "customer": "c-17",\n', data[0])  # pretty-printed
        yield self.screenshot("page-stream.png")

        # the live tail: an event persisted through the server appears within a second
        yield self.browser(lambda driver: driver.get(self.base + "#tail"))
        yield self.browser(lambda driver: self.fill(driver, "tail-form", {"domain": "order"}))
        yield self.wait(lambda driver: "Following new events after position"
                        in driver.find_element("id", "tail-status").text, what="the tail's start")
        yield self.browser(lambda driver: driver.execute_script("""
            window.seenAt = {};
            new MutationObserver(() => {
              for (const row of document.querySelectorAll("#tail-table tbody tr")) {
                if (!(row.dataset.position in window.seenAt)) window.seenAt[row.dataset.position] = Date.now();
              }
            }).observe(document.querySelector("#tail-table tbody"), {childList: true});"""))
        left_out = yield self.persist("user-18", "user", "registered", {"plan": "free"})
        sent = time.time()
        position = yield self.persist("order-1003", "order", "created",
                                      {"customer": "c-9", "items": [{"sku": "INK-3", "quantity": 5}]})
        answered = time.time()
        seen = yield self.wait(lambda driver: driver.execute_script(
            "return window.seenAt[arguments[0]] || null", str(position)), timeout=10,
            what="the persisted event in the live tail")
        latency = seen / 1000 - answered
        log.info("measured: an event appeared in the page's live tail {latency:.3f} s after its "
                 "persist was answered ({total:.3f} s after it was sent)", latency=latency,
                 total=seen / 1000 - sent)
        self.assertLess(latency, 1.0)
        shown = yield self.browser(self.texts, "#tail-table tbody td:first-child")
        self.assertEqual(shown, [str(position)])  # (not the user event: the filter left it out)
        self.assertNotIn(str(left_out), shown)
        for i, name in enumerate(["paid", "packed"]):
            yield self.persist("order-1003", "order", name, {"step": i + 1})
        yield self.wait(lambda driver: len(self.texts(driver, "#tail-table tbody tr")) == 3)
        yield sleep(1.6)  # (the highlight of new rows fades)
        yield self.screenshot("page-tail.png")
        yield self.browser(lambda driver: driver.find_element("id", "tail-stop").click())

        # the server's state and its throughput chart, with a subscription and a fetch open
        subscription, fetch = unique("reply-subscription"), unique("reply-fetch")
        for channel in (subscription, fetch):
            yield self.client.subscribe(channel)
        yield self.client.request("subscribe", {
            "v": 2, "channel": subscription, "from": "end", "window": 50,
            "query": {"$select": {"$where": {"domain": "order", "name": "paid"}}}})
        yield self.client.request("fetch", {"channel": fetch, "query": {"$select": {}}})
        yield self.client.wait_count(fetch, 1)
        yield self.browser(lambda driver: driver.get(self.base + "#server"))
        yield self.wait(lambda driver: len(self.texts(driver, "#chart rect.written")) == len(WAVES)
                        and len(self.texts(driver, "#subscriptions-table tbody tr")) == 1
                        and len(self.texts(driver, "#streams-table tbody tr")) == 1,
                        what="the throughput chart, the subscription and the stream")
        facts = yield self.browser(self.texts, "#server-facts div")
        self.assertIn("serving\nyes", facts)
        self.assertIn(f"table\n{self.table}", facts)
        self.assertIn("subscriptions\n1 of 10000", facts)
        rows = yield self.browser(self.texts, "#subscriptions-table tbody td")
        self.assertEqual(rows[:2], [subscription, "live"])
        rows = yield self.browser(self.texts, "#streams-table tbody td")
        self.assertEqual(rows[:3], [fetch, "1", "awaiting-accept"])
        yield self.screenshot("page-server.png")
        yield self.client.request("fetch-next", {"v": 2, "channel": subscription, "end": True})
        yield self.client.publish(fetch, '"end"')

        # every request of the page to /api carried the token, in its header only
        api = [(method, uri, auth) for method, uri, auth in self.requests[before_login:]
               if uri.startswith("/api/")]
        self.assertEqual({uri.split("?")[0].rsplit("/", 1)[0] if "/stream/" in uri
                          else uri.split("?")[0] for _, uri, _ in api},
                         {"/api/state", "/api/events", "/api/stream", "/api/tail"})
        for method, uri, auth in api:
            self.assertEqual((method, auth), ("GET", f"Bearer {TOKEN}".encode()), uri)
        for _, uri, _ in self.requests:
            self.assertNotIn(TOKEN, uri)
        self.assertIn("/api/tail?domain=order", [uri for _, uri, _ in api])
        # and the browser saw no error but the two 401s that made it ask (no token, a wrong one)
        messages = yield self.browser(lambda driver: driver.get_log("browser"))
        errors = [m["message"] for m in messages if m["level"] == "SEVERE"]
        self.assertEqual([m for m in errors if "401" not in m], [])
        self.assertEqual(len([m for m in errors if "401" in m]), 2, errors)
