"""
A real Prometheus (Debian's ``prometheus`` package; ``.ci/run`` installs it)
scrapes a running server, with the bearer token, every second: its targets
page says the scrape is up, its query API returns the server's counts, and
``promtool check metrics`` passes what it scraped.
"""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request

from twisted.internet import defer, threads

from tests.support import IntegrationTestCase, free_port, sleep, unique
from tests.test_http import http_request

TOKEN = "prometheus-scrapes-with-this-token"

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: eventsource
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: {token}
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


class PrometheusTests(IntegrationTestCase):
    timeout = 120
    server_config = {"http_port": 0, "http_token": TOKEN}

    @defer.inlineCallbacks
    def setUp(self):
        self.prometheus_bin = shutil.which("prometheus")
        self.promtool = shutil.which("promtool")
        if not (self.prometheus_bin and self.promtool):
            self.fail("needs Debian's prometheus package (prometheus, promtool): .ci/run installs"
                      " it with apt-get")
        yield super().setUp()
        self.http_port = self.server.getServiceNamed("http").port
        self.folder = tempfile.mkdtemp(prefix="prometheus-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        config = os.path.join(self.folder, "prometheus.yml")
        with open(config, "w") as f:
            f.write(CONFIG.format(token=TOKEN, port=self.http_port))
        check = subprocess.run([self.promtool, "check", "config", config],
                               capture_output=True, text=True, timeout=60)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.api_port = free_port()
        self.log_path = os.path.join(self.folder, "prometheus.log")
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [self.prometheus_bin, f"--config.file={config}",
                 f"--storage.tsdb.path={os.path.join(self.folder, 'data')}",
                 f"--web.listen-address=127.0.0.1:{self.api_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.folder)
        self.addCleanup(self.stop_prometheus)

    def stop_prometheus(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, path, **params):
        """Prometheus' HTTP API (in a thread): the ``data`` of its answer, or None."""
        def call():
            url = f"http://127.0.0.1:{self.api_port}/api/v1/{path}"
            if params:
                url += "?" + urllib.parse.urlencode(params)
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    answer = json.loads(response.read())
            except OSError:
                return None  # (not listening yet)
            return answer["data"] if answer.get("status") == "success" else None
        return threads.deferToThread(call)

    @defer.inlineCallbacks
    def query(self, expression):
        """The value of an instant query with one result, or None."""
        data = yield self.api("query", query=expression)
        if not data or len(data["result"]) != 1:
            return None
        return float(data["result"][0]["value"][1])

    @defer.inlineCallbacks
    def wait_for(self, expression, expected, timeout=60):
        seen = []

        @defer.inlineCallbacks
        def poll():
            seen.append((yield self.query(expression)))

        yield poll()
        waited = 0.0
        while seen[-1] != expected:
            self.assertIsNone(self.process.poll(), open(self.log_path).read())
            if waited > timeout:
                self.fail(f"{expression} never became {expected}: last {seen[-5:]}")
            yield sleep(0.25)
            waited += 0.25
            yield poll()

    @defer.inlineCallbacks
    def test_prometheus_scrapes_the_server(self):
        yield self.wait_for('up{job="eventsource"}', 1.0)
        targets = yield self.api("targets")
        (target,) = targets["activeTargets"]
        self.assertEqual((target["health"], target["lastError"]), ("up", ""))
        for i in range(3):
            reply = yield self.client.persist([{"pid": unique("p"), "domain": "d", "name": "n"}
                                               for _ in range(i + 1)])
            self.assertEqual(reply[0]["affectedRows"], i + 1)
        messages = yield self.client.fetch({"$where": {"domain": "d"}})
        self.assertEqual(len(messages), 7)
        yield self.wait_for("eventsource_events_written_total", 6.0)
        yield self.wait_for('eventsource_requests_total{kind="persist",result="ok"}', 3.0)
        yield self.wait_for("eventsource_rows_sent_total", 6.0)
        yield self.wait_for("eventsource_group_commit_persists_sum", 3.0)
        yield self.wait_for("eventsource_redis_connected", 1.0)
        # a histogram Prometheus can compute with
        quantile = yield self.query(
            "histogram_quantile(0.5, eventsource_append_latency_seconds_bucket)")
        self.assertIsNotNone(quantile)
        self.assertGreater(quantile, 0)
        # what Prometheus scraped passes Prometheus' own linter
        status, _, body = yield http_request(self.http_port, "/metrics",
                                             headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 200)
        check = subprocess.run([self.promtool, "check", "metrics"], input=body,
                               capture_output=True, timeout=60)
        self.assertEqual((check.returncode, check.stdout + check.stderr), (0, b""))

    @defer.inlineCallbacks
    def test_a_scrape_without_the_token_is_refused(self):
        """Prometheus with a wrong token: the target is down, with the 401."""
        config = os.path.join(self.folder, "prometheus.yml")
        self.stop_prometheus()
        with open(config, "w") as f:
            f.write(CONFIG.format(token="not-the-right-token-at-all", port=self.http_port))
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [self.prometheus_bin, f"--config.file={config}",
                 f"--storage.tsdb.path={os.path.join(self.folder, 'data2')}",
                 f"--web.listen-address=127.0.0.1:{self.api_port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.folder)
        yield self.wait_for('up{job="eventsource"}', 0.0)
        targets = yield self.api("targets")
        (target,) = targets["activeTargets"]
        self.assertIn("401", target["lastError"])
