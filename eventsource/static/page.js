// The eventsource page: reads /api/* (docs/OPERATIONS.md, "The page") and shows it.
// No framework, no build step. Every value from the server goes into the page as
// text (textContent), never as markup.
"use strict";

(() => {
  const TOKEN_KEY = "eventsource.token";
  const TAIL_ROWS = 500;        // rows the live tail keeps on screen
  const STATE_EVERY = 5000;     // ms between reads of /api/state
  const RETRY_AFTER = 2000;     // ms before a broken tail is opened again
  const VIEWS = ["events", "stream", "tail", "server"];

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let lastState = null;

  // -- talking to the server -------------------------------------------------

  class NeedsToken extends Error {}

  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  async function api(path, options = {}) {
    const response = await fetch(path, { headers: authHeaders(), cache: "no-store", ...options });
    if (response.status === 401) {
      const refused = Boolean(token);
      askForToken();
      if (refused) showError(new Error("The server refused that token."));
      throw new NeedsToken("the token is needed");
    }
    return response;
  }

  async function apiJson(path) {
    const response = await api(path);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") search.set(name, value);
    }
    const text = search.toString();
    return text ? "?" + text : "";
  }

  function showError(error) {
    if (error instanceof NeedsToken) return;
    const box = $("error");
    box.textContent = error ? String(error.message || error) : "";
    box.hidden = !error;
  }

  // -- the token -------------------------------------------------------------

  function askForToken() {
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    stopTail("Not following.");
    for (const view of VIEWS) $("view-" + view).hidden = true;
    $("login").hidden = false;
    $("forget").hidden = true;
    $("health").textContent = "the token is needed";
    $("health").className = "health";
    $("token").focus();
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login").hidden = true;
    $("forget").hidden = false;
    start();
  });

  $("forget").addEventListener("click", () => askForToken());

  // -- small helpers for building the page -----------------------------------

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function streamLink(pid) {
    const link = element("a", pid);
    link.href = "#stream/" + encodeURIComponent(pid);
    return link;
  }

  function preview(event) {
    if (event.omittedBytes !== undefined) return `(${event.omittedBytes} bytes: too large to show here)`;
    const text = JSON.stringify(event.data);
    return text.length > 100 ? text.slice(0, 99) + "…" : text;
  }

  function eventRow(event) {
    const row = element("tr");
    row.dataset.position = event.position;
    row.append(element("td", event.position, "number"), element("td", event.timestamp, "time"));
    const pid = element("td");
    pid.append(streamLink(event.pid));
    row.append(pid, element("td", event.version, "number"), element("td", event.domain),
      element("td", event.name));
    const data = element("td", null, "data");
    data.append(element("code", preview(event)));
    row.append(data);
    return row;
  }

  function formValues(form) {
    return Object.fromEntries(new FormData(form).entries());
  }

  // -- Events: the last events, filtered -------------------------------------

  const events = { filter: {}, oldest: null };

  async function loadEvents(older) {
    const form = formValues($("events-form"));
    if (!older) {
      events.filter = { pid: form.pid, domain: form.domain, name: form.name, limit: form.limit };
      events.oldest = null;
    }
    const params = { ...events.filter };
    if (older) params.before = events.oldest;
    const body = await apiJson("api/events" + query(params));
    const rows = $("events-table").tBodies[0];
    if (!older) rows.replaceChildren();
    for (const event of body.events) rows.append(eventRow(event));
    if (body.events.length) events.oldest = body.events[body.events.length - 1].position;
    $("events-empty").hidden = rows.rows.length > 0;
    $("events-older").hidden = !body.more;
    showError(null);
  }

  $("events-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadEvents(false).catch(showError);
  });
  $("events-form").addEventListener("reset", () => {
    setTimeout(() => loadEvents(false).catch(showError), 0);
  });
  $("events-older").addEventListener("click", () => loadEvents(true).catch(showError));

  // -- Stream: one stream's events, in version order -------------------------

  const stream = { pid: null, next: 0 };

  function eventCard(event) {
    const card = element("li", null, "card");
    const head = element("div", null, "card-head");
    head.append(element("strong", "v" + event.version), element("span", event.name, "name"),
      element("span", event.domain, "domain"), element("span", "position " + event.position),
      element("span", event.timestamp, "time"), element("span", event.eventId, "id"));
    const data = event.omittedBytes !== undefined
      ? `(${event.omittedBytes} bytes: too large to show here; read it with eventsource read)`
      : JSON.stringify(event.data, null, 2);
    card.append(head, element("pre", data));
    return card;
  }

  async function loadStream(pid, from, more) {
    const body = await apiJson("api/stream/" + encodeURIComponent(pid) + query({ from_version: from }));
    const list = $("stream-events");
    if (!more) list.replaceChildren();
    for (const event of body.events) list.append(eventCard(event));
    stream.pid = pid;
    if (body.events.length) stream.next = body.events[body.events.length - 1].version + 1;
    const shown = list.children.length;
    $("stream-summary").textContent = shown
      ? `${shown} events of ${pid} from version ${list.firstChild.querySelector("strong").textContent.slice(1)}`
      : `${pid} has no events from version ${from}.`;
    $("stream-more").hidden = !body.more;
    showError(null);
  }

  $("stream-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = formValues($("stream-form"));
    const target = "#stream/" + encodeURIComponent(form.pid);
    if (location.hash === target) loadStream(form.pid, form.from || 0, false).catch(showError);
    else location.hash = target;
  });
  $("stream-more").addEventListener("click", () => loadStream(stream.pid, stream.next, true).catch(showError));

  // -- Live tail: server-sent events, read with fetch() to send the token ------

  const tail = { controller: null, params: null, seen: 0, last: null };

  function tailStatus(text) {
    $("tail-status").textContent = text;
  }

  function stopTail(text) {
    if (tail.controller) tail.controller.abort();
    tail.controller = null;
    $("tail-start").disabled = false;
    $("tail-stop").disabled = true;
    if (text) tailStatus(text);
  }

  function parseBlock(block) {
    const message = { event: "message", data: [], id: null };
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") message.event = value;
      else if (field === "data") message.data.push(value);
      else if (field === "id") message.id = value;
    }
    return { ...message, data: message.data.join("\n") };
  }

  function onTailMessage(message) {
    if (message.event === "ready") {
      const position = JSON.parse(message.data).position;
      tailStatus(`Following new events after position ${position}.` +
        (tail.last !== null && position > tail.last
          ? ` (Reconnected: events ${tail.last + 1} to ${position} are under Events.)` : ""));
      tail.last = position;
    } else if (message.event === "event") {
      const event = JSON.parse(message.data);
      const rows = $("tail-table").tBodies[0];
      const row = eventRow(event);
      row.classList.add("new");
      rows.prepend(row);
      while (rows.rows.length > TAIL_ROWS) rows.deleteRow(-1);
      tail.seen += 1;
      tail.last = event.position;
      tailStatus(`Following: ${tail.seen} events so far, the last at position ${event.position}.`);
    } else if (message.event === "failed") {
      throw new Error("the tail ended: " + JSON.parse(message.data).error);
    }
  }

  async function followTail(controller) {
    const response = await api("api/tail" + query(tail.params), { signal: controller.signal });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error || message;
      } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        onTailMessage(parseBlock(block));
      }
    }
  }

  function startTail(fresh) {
    stopTail(null);
    const controller = new AbortController();
    tail.controller = controller;
    if (fresh) {
      const form = formValues($("tail-form"));
      tail.params = { pid: form.pid, domain: form.domain, name: form.name };
      tail.seen = 0;
      tail.last = null;
      $("tail-table").tBodies[0].replaceChildren();
    }
    $("tail-start").disabled = true;
    $("tail-stop").disabled = false;
    tailStatus("Connecting…");
    followTail(controller).then(
      () => retryTail(controller, "The server closed the tail"),
      (error) => {
        if (controller.signal.aborted || error instanceof NeedsToken) return;
        retryTail(controller, String(error.message || error));
      });
  }

  function retryTail(controller, why) {
    if (tail.controller !== controller) return;
    tailStatus(`${why}; trying again in ${RETRY_AFTER / 1000} s…`);
    setTimeout(() => {
      if (tail.controller === controller) startTail(false);
    }, RETRY_AFTER);
  }

  $("tail-form").addEventListener("submit", (event) => {
    event.preventDefault();
    startTail(true);
  });
  $("tail-stop").addEventListener("click", () => stopTail("Stopped."));

  // -- Server: state, throughput chart, open streams --------------------------

  function duration(seconds) {
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    return `${Math.round(seconds / 3600)} h`;
  }

  function fact(list, term, value) {
    const group = element("div");
    group.append(element("dt", term), element("dd", value));
    list.append(group);
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceCeiling(value) {
    if (value <= 5) return 5;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (step * power >= value) return step * power;
    return 10 * power;
  }

  function drawChart(throughput) {
    const chart = $("chart");
    chart.replaceChildren();
    const width = 720, height = 180, left = 48, bottom = 22, top = 8;
    const plotWidth = width - left - 8, plotHeight = height - top - bottom;
    const samples = throughput.samples;
    const capacity = throughput.capacity;
    const highest = niceCeiling(Math.max(0, ...samples.map((s) => Math.max(s.written, s.sent))));
    const y = (value) => top + plotHeight - (value / highest) * plotHeight;
    const slot = plotWidth / capacity;
    chart.append(
      svg("line", { x1: left, x2: width - 8, y1: y(0), y2: y(0), class: "axis" }),
      svg("line", { x1: left, x2: width - 8, y1: y(highest), y2: y(highest), class: "grid" }),
      svg("line", { x1: left, x2: width - 8, y1: y(highest / 2), y2: y(highest / 2), class: "grid" }),
      svg("text", { x: left - 6, y: y(highest) + 4, class: "label end" }, String(highest)),
      svg("text", { x: left - 6, y: y(highest / 2) + 4, class: "label end" }, String(highest / 2)),
      svg("text", { x: left - 6, y: y(0) + 4, class: "label end" }, "0"),
      svg("text", { x: left, y: height - 6, class: "label" },
        `${Math.round((capacity * throughput.period) / 60)} min ago`),
      svg("text", { x: width - 8, y: height - 6, class: "label end" }, "now"));
    if (!samples.length) {
      chart.append(svg("text", { x: left + plotWidth / 2, y: top + plotHeight / 2, class: "label middle" },
        `a sample every ${throughput.period} s; the first comes ${throughput.period} s after the start`));
      return;
    }
    const first = capacity - samples.length;
    const points = [];
    samples.forEach((sample, k) => {
      const x = left + (first + k) * slot;
      const bar = svg("rect", {
        x: x + 1, y: y(sample.written), width: Math.max(1, slot - 2),
        height: Math.max(0, y(0) - y(sample.written)), class: "written",
      });
      bar.append(svg("title", {}, `${sample.written} events written, ${sample.sent} rows sent to fetches ` +
        `in the 10 s to ${new Date(sample.end * 1000).toLocaleTimeString()}`));
      chart.append(bar);
      points.push(`${x + slot / 2},${y(sample.sent)}`);
    });
    chart.append(svg("polyline", { points: points.join(" "), class: "sent" }));
  }

  function showState(state) {
    const health = $("health");
    health.textContent = (state.serving ? "serving " : "not serving ") + state.table;
    health.className = "health " + (state.serving ? "up" : "down");
    if ($("view-server").hidden) return;
    const facts = $("server-facts");
    facts.replaceChildren();
    fact(facts, "serving", state.serving ? "yes" : "no");
    fact(facts, "table", state.table + (state.readOnly ? " (read-only)" : ""));
    fact(facts, "version", state.version);
    fact(facts, "up for", duration(state.uptimeSeconds));
    fact(facts, "last position", state.lastPosition === null ? "none written here yet" : state.lastPosition);
    fact(facts, "events written", state.eventsWritten);
    fact(facts, "persists in flight", state.persistsInFlight);
    fact(facts, "open streams", `${state.streams.open} of ${state.streams.max}`);
    if (state.subscriptions) {
      fact(facts, "subscriptions", `${state.subscriptions.open} of ${state.subscriptions.max}`);
    }
    fact(facts, "live tails", `${state.tails.open} of ${state.tails.max}`);
    if (state.pool) {
      fact(facts, "database pool", `${state.pool.inUse} of ${state.pool.threads} busy; ` +
        `${state.pool.queuedReads} reads, ${state.pool.queuedWrites} writes queued`);
    }
    drawChart(state.throughput);
    const rows = $("streams-table").tBodies[0];
    rows.replaceChildren();
    for (const s of state.streams.listed) {
      const row = element("tr");
      row.append(element("td", s.channel), element("td", s.version, "number"), element("td", s.state),
        element("td", s.window, "number"), element("td", s.rowsSent, "number"),
        element("td", s.rowsAccepted, "number"));
      rows.append(row);
    }
    $("streams-table").hidden = !state.streams.listed.length;
    $("streams-empty").hidden = state.streams.listed.length > 0;
    const subscriptions = state.subscriptions;
    $("subscriptions-part").hidden = !subscriptions;
    if (subscriptions) {
      const subRows = $("subscriptions-table").tBodies[0];
      subRows.replaceChildren();
      for (const s of subscriptions.listed) {
        const row = element("tr");
        row.append(element("td", s.channel), element("td", s.state), element("td", s.position, "number"),
          element("td", s.window, "number"), element("td", s.rowsSent, "number"),
          element("td", s.heldBytes, "number"));
        subRows.append(row);
      }
      $("subscriptions-table").hidden = !subscriptions.listed.length;
      $("subscriptions-empty").hidden = subscriptions.listed.length > 0;
    }
  }

  async function loadState() {
    lastState = await apiJson("api/state");
    showState(lastState);
  }

  // -- views -------------------------------------------------------------------

  function route() {
    if (!$("login").hidden) return;
    const [view, ...rest] = (location.hash.slice(1) || "events").split("/");
    const shown = VIEWS.includes(view) ? view : "events";
    for (const name of VIEWS) {
      $("view-" + name).hidden = name !== shown;
      $("nav-" + name).classList.toggle("current", name === shown);
    }
    showError(null);
    if (shown === "events" && !$("events-table").tBodies[0].rows.length) {
      loadEvents(false).catch(showError);
    } else if (shown === "stream" && rest.length) {
      const pid = decodeURIComponent(rest.join("/"));
      $("stream-form").elements.pid.value = pid;
      const from = pid === stream.pid ? $("stream-form").elements.from.value || 0 : 0;
      $("stream-form").elements.from.value = from;
      loadStream(pid, from, false).catch(showError);
    } else if (shown === "server") {
      if (lastState) showState(lastState);
      loadState().catch(showError);
    }
  }

  async function start() {
    try {
      await loadState();
    } catch (error) {
      showError(error);
      if (error instanceof NeedsToken) return;
    }
    $("forget").hidden = !token;
    route();
  }

  window.addEventListener("hashchange", route);
  setInterval(() => {
    if ($("login").hidden && document.visibilityState === "visible") loadState().catch(() => {});
  }, STATE_EVERY);
  start();
})();
