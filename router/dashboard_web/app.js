"use strict";
// The splitserve operator dashboard. Renders the snapshots of /dashboard/events (one a second), read
// with fetch so that the admin token travels in a header (EventSource cannot send one); the charts
// open on /dashboard/api/history. Actions POST to /admin/{scale,drain} with the admin token, after
// a confirm dialog, and only with a token. Text from the server always goes in through textContent.

(() => {
  const HISTORY_POINTS = 120; // two minutes at one snapshot a second
  const COLORS = { p50: "#58a6ff", p99: "#f0883e", slo: "#f85149", green: "#3fb950", purple: "#bc8cff", grey: "#8b949e" };

  const dashboard = { charts: null, snapshot: null, lastPointAt: null, historyLoaded: false };
  window.splitserve = dashboard; // for the console and the browser tests
  let chartsLoading = false;
  let workersKey = "";
  const lastDesired = {};

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const clock = (at) => new Date(at * 1000).toLocaleTimeString([], { hour12: false });
  const shortId = (id) => (id && id.length > 12 ? id.slice(0, 8) : id || "—");
  const ms = (seconds) => (seconds === null || seconds === undefined ? null : seconds * 1000);
  const percent = (share) => (share === null || share === undefined ? null : share * 100);

  // -- live feed -------------------------------------------------------------------------------------

  const tokenInput = $("admin-token");
  const token = () => tokenInput.value.trim();
  const sleep = (ms_) => new Promise((resolve) => setTimeout(resolve, ms_));
  let feed = null; // the AbortController of the running feed

  // The feed, with the token given when it starts; a refused token stops it until another is given.
  async function connect() {
    if (feed) feed.abort();
    // Tried without a token too: a router without admin auth serves its data to anyone, and asks for none.
    const secret = token();
    const controller = new AbortController();
    feed = controller;
    while (feed === controller) {
      try {
        const headers = secret ? { "X-Admin-Token": secret } : {};
        const response = await fetch("/dashboard/events", { headers, signal: controller.signal, cache: "no-store" });
        if ((response.status === 401 || response.status === 403) && !secret) {
          setConnection("no admin token");
          return showBanner($("token-needed"), "Enter the admin token to see the cluster (`splitserve up` prints where it is).");
        }
        if (response.status === 401 || response.status === 403) {
          const payload = await response.json().catch(() => ({}));
          setConnection("token refused");
          return showBanner($("token-needed"), `The router refused the admin token: ${(payload.error && payload.error.message) || response.status}`);
        }
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        showBanner($("token-needed"), "");
        setConnection("live");
        await readEvents(response.body, (data) => render(JSON.parse(data)));
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      setConnection("reconnecting…");
      await sleep(1000);
    }
  }

  async function readEvents(body, onData) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const data = lines.filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
        if (data) onData(data);
      }
    }
  }

  function setConnection(state) {
    const pill = $("connection");
    pill.textContent = state;
    pill.className = `pill ${state === "live" ? "pill-on" : "pill-off"}`;
  }

  function render(snapshot) {
    dashboard.snapshot = snapshot;
    const model = snapshot.model ?? `not known yet${snapshot.model_refusal ? ` (${snapshot.model_refusal})` : ""}`;
    $("model").textContent = `model ${model}${snapshot.transport ? ` · ${snapshot.transport} transport` : ""}` +
      ` · router: ${snapshot.router.running} running, ${snapshot.router.queued} queued`;
    $("updated").textContent = `updated ${clock(snapshot.at)}`;
    $("window-note").textContent = `· latency percentiles and attainment over the last ${snapshot.window_s} s`;
    showBanner($("control-error"), snapshot.control_error);
    renderPools(snapshot);
    renderNodes(snapshot);
    renderActivity(snapshot);
    renderCharts(snapshot);
  }

  function showBanner(banner, text) {
    banner.hidden = !text;
    banner.textContent = text || "";
  }

  // -- topology --------------------------------------------------------------------------------------

  function renderPools(snapshot) {
    const container = $("pools");
    for (const [role, pool] of Object.entries(snapshot.pools)) {
      let card = $(`pool-${role}`);
      if (!card) {
        card = poolCard(role);
        container.append(card);
      }
      card.querySelector(".ready").textContent = pool.ready;
      card.querySelector(".desired").textContent = pool.desired ?? "—";
      card.querySelector(".bounds").textContent = pool.min === null ? "static workers (no control plane)" : `min ${pool.min} · max ${pool.max}`;
      const input = card.querySelector("input");
      input.min = pool.min ?? 0;
      input.max = pool.max ?? 0;
      if (pool.desired !== lastDesired[role] && document.activeElement !== input) input.value = pool.desired ?? "";
      lastDesired[role] = pool.desired;
      const button = card.querySelector("button");
      button.disabled = !snapshot.actions_enabled;
      button.title = actionsDisabledReason(snapshot);
    }
    const planner = snapshot.planner;
    const decision = planner && planner.decisions.length ? planner.decisions[0] : null;
    $("pools").dataset.planner = planner ? (planner.enabled ? "on" : "off") : "none";
    let note = $("planner-note");
    if (!note) {
      note = el("p", { id: "planner-note", class: "muted" });
      container.after(note);
    }
    note.textContent = !planner ? "" : `SLO planner ${planner.enabled ? "on" : "off"}` +
      (decision ? ` · last: ${decision.role} ${decision.current} → ${decision.target} at ${clock(decision.at)} (${decision.reason})` : "");
  }

  function actionsDisabledReason(snapshot) {
    if (!snapshot.control) return "this router has no control plane (static workers)";
    return snapshot.actions_enabled ? "" : "admin actions are disabled: the router has no admin token configured";
  }

  function poolCard(role) {
    const input = el("input", { type: "number", id: `scale-${role}`, step: 1, "aria-label": `${role} replicas` });
    const button = el("button", { class: "scale-btn", dataset: { role } }, "Scale");
    button.addEventListener("click", () => {
      const replicas = Number.parseInt(input.value, 10);
      if (Number.isNaN(replicas)) return showResult("error", `Enter a number of ${role} workers first.`);
      act("scale", { role, replicas }, `Scale the ${role} pool to ${replicas} worker${replicas === 1 ? "" : "s"}?`);
    });
    return el("div", { class: `pool pool-${role}`, id: `pool-${role}` },
      el("h3", {}, role),
      el("div", { class: "count" }, el("b", { class: "ready" }), " ready / ", el("span", { class: "desired" }), " desired"),
      el("div", { class: "bounds muted" }),
      el("div", { class: "scale" }, input, button));
  }

  function renderNodes(snapshot) {
    const key = JSON.stringify([snapshot.nodes, snapshot.workers, snapshot.actions_enabled]);
    if (key === workersKey) return;
    workersKey = key;
    const byId = Object.fromEntries(snapshot.workers.map((w) => [w.id, w]));
    const nodes = snapshot.nodes.map((node) => el("div", { class: "node" },
      el("h3", { title: node.id }, `node ${shortId(node.id) || "?"} `, el("span", { class: "muted" }, node.hosts.join(", "))),
      el("div", { class: "workers" }, ...node.workers.map((id) => workerCard(byId[id], snapshot)))));
    $("nodes").replaceChildren(...(nodes.length ? nodes : [el("p", { class: "muted" }, "no workers")]));
  }

  function workerCard(worker, snapshot) {
    const kv = worker.kv;
    // One number for the bar and its text: blocks in use over the pool. Cached blocks overlap both used
    // and free (a published block may be in use or reusable), so they are counted in the text only.
    const used = kv.total ? Math.min(100, (100 * kv.used) / kv.total) : 0;
    const drain = el("button", { class: "drain-btn", dataset: { worker: worker.id } }, "Drain");
    drain.disabled = !snapshot.actions_enabled || !["ready", "unhealthy"].includes(worker.state);
    drain.title = actionsDisabledReason(snapshot);
    drain.addEventListener("click", () => act("drain", { worker_id: worker.id },
      `Drain ${worker.role} worker ${worker.id}? It takes no new work, finishes what it has, then exits; its pool shrinks by one.`));
    const load = worker.load;
    const incompatible = worker.incompatible
      ? el("div", { class: "incompatible", title: worker.incompatible }, `not routed to: ${worker.incompatible}`)
      : null;
    const down = worker.down_reason
      ? el("div", { class: "incompatible down-reason", title: "why this router took the worker out of routing (a failed health check or call)" },
        `down: ${worker.down_reason}`)
      : null;
    const unreached = worker.kv_unreachable_from.length
      ? el("div", { class: "incompatible kv-unreached", title: "these prefill workers could not reach this worker's KV receiver: not paired with it for now" },
        `KV not reachable from: ${worker.kv_unreachable_from.join(", ")}`)
      : null;
    const classes = `worker worker-${worker.state}${worker.incompatible ? " worker-incompatible" : ""}`;
    return el("div", { class: classes, dataset: { workerId: worker.id } },
      el("div", { class: "worker-head" },
        el("span", { class: `badge badge-${worker.role}` }, worker.role),
        el("b", { class: "worker-id" }, worker.id),
        el("span", { class: `state state-${worker.state}` }, worker.state)),
      el("div", { class: "muted" }, worker.address || "no address yet", worker.restarts ? ` · ${worker.restarts} restart(s)` : ""),
      incompatible,
      down,
      unreached,
      el("div", {}, `running ${load.running} · waiting ${load.waiting + load.waiting_for_kv} · from this router ${worker.active}`),
      el("div", { class: "kvbar", title: `KV blocks: ${kv.used} used, ${kv.free} free, of ${kv.total}; ${kv.cached} in the prefix cache` },
        el("span", { class: "kv-used", style: `width:${used}%` })),
      el("div", { class: "muted kv-text" }, `KV ${kv.used}/${kv.total} blocks used (${used.toFixed(1)}%) · ${kv.cached} in the prefix cache`),
      drain);
  }

  // -- actions ---------------------------------------------------------------------------------------

  function confirmDialog(question) {
    const dialog = $("confirm");
    $("confirm-text").textContent = question;
    dialog.returnValue = "";
    dialog.showModal();
    return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
  }

  async function act(kind, body, question) {
    // Without a token the router refuses; say so before asking to confirm something that cannot happen.
    if (!token()) return showResult("error", "Enter the admin token first: actions need it.");
    if (!(await confirmDialog(question))) return;
    const headers = { "Content-Type": "application/json", "X-Admin-Token": token() };
    showResult("pending", `${question.split("?")[0]}…`);
    let response;
    let payload = {};
    try {
      response = await fetch(`/admin/${kind}`, { method: "POST", headers, body: JSON.stringify(body) });
      payload = await response.json().catch(() => ({}));
    } catch (error) {
      return showResult("error", `Could not reach the router: ${error}`);
    }
    if (!response.ok) {
      const reason = (payload.error && payload.error.message) || response.statusText;
      return showResult("error", `Refused (${response.status}): ${reason}`);
    }
    showResult("ok", kind === "scale"
      ? `The ${body.role} pool is now set to ${payload.desired ?? body.replicas}; workers appear below as they start or drain.` +
        (payload.planner ? ` Note: ${payload.planner}.` : "")
      : `Worker ${body.worker_id} is draining; it leaves the topology once its work is done.`);
  }

  function showResult(kind, text) {
    const banner = $("action-result");
    banner.className = `banner banner-${kind}`;
    banner.dataset.kind = kind;
    showBanner(banner, text);
  }

  // -- activity --------------------------------------------------------------------------------------

  function renderActivity(snapshot) {
    $("routes").replaceChildren(...snapshot.routes.map((r) => el("tr", { title: r.reason },
      el("td", {}, clock(r.at)), el("td", { class: "mono" }, shortId(r.request_id)),
      el("td", {}, el("span", { class: `decision decision-${r.decision}` }, r.decision)),
      el("td", { class: "mono" }, r.prefill || "—"), el("td", { class: "mono" }, r.decode), el("td", {}, r.uncached_tokens))));
    $("errors").replaceChildren(...snapshot.errors.map((e) => el("tr", {},
      el("td", {}, clock(e.at)), el("td", { class: "status-error" }, e.status), el("td", { class: "mono" }, e.path), el("td", {}, e.message))));
    if (!snapshot.routes.length) $("routes").append(emptyRow(6, "no requests yet"));
    if (!snapshot.errors.length) $("errors").append(emptyRow(4, "no errors"));
  }

  const emptyRow = (span, text) => el("tr", {}, el("td", { colSpan: span, class: "muted" }, text));

  // -- charts ----------------------------------------------------------------------------------------

  // Each chart: datasets, each with the point value it plots (a point: a snapshot's at, series and slo).
  // The fourth item marks an SLO line: shown only while an SLO is set (slo is null otherwise).
  const CHARTS = {
    ttft: [["p50", COLORS.p50, (s) => ms(s.series.ttft_p50_s)], ["p99", COLORS.p99, (s) => ms(s.series.ttft_p99_s)],
      ["SLO", COLORS.slo, (s) => (s.slo ? ms(s.slo.ttft_s) : null), true]],
    tpot: [["p50", COLORS.p50, (s) => ms(s.series.tpot_p50_s)], ["p99", COLORS.p99, (s) => ms(s.series.tpot_p99_s)],
      ["SLO", COLORS.slo, (s) => (s.slo ? ms(s.slo.tpot_s) : null), true]],
    slo: [["TTFT ≤ SLO", COLORS.p50, (s) => percent(s.series.ttft_attainment)], ["TPOT ≤ SLO", COLORS.p99, (s) => percent(s.series.tpot_attainment)]],
    tokens: [["generated", COLORS.green, (s) => s.series.tokens_per_s]],
    requests: [["finished", COLORS.p50, (s) => s.series.requests_per_s], ["errors", COLORS.slo, (s) => s.series.errors_per_s]],
    kv: [["moved", COLORS.purple, (s) => s.series.kv_transfer_gbps]],
  };

  function renderCharts(snapshot) {
    $("kv-note").textContent = snapshot.series.kv_transfer_gbps === null ? "(not reported by the workers)" : "";
    if (!snapshot.chart_library) {
      showBanner($("chart-missing"), "Charts are unavailable: the chart library is not installed on the router. " +
        "Run `npm ci --prefix router/dashboard_web` (part of `make setup`) and reload.");
      $("chart-grid").hidden = true;
      return;
    }
    $("figure-slo").hidden = !snapshot.slo;
    if (!dashboard.charts) return loadCharts();
    if (dashboard.historyLoaded) addPoints([snapshot]);
  }

  // Points newer than the last one drawn, oldest first; then the SLO lines shown or hidden as the newest says.
  function addPoints(points) {
    const fresh = points.filter((p) => dashboard.lastPointAt === null || p.at > dashboard.lastPointAt);
    if (!fresh.length) return;
    dashboard.lastPointAt = fresh[fresh.length - 1].at;
    const sloSet = Boolean(fresh[fresh.length - 1].slo);
    for (const [name, chart] of Object.entries(dashboard.charts)) {
      for (const point of fresh) {
        chart.data.labels.push(clock(point.at));
        CHARTS[name].forEach(([, , pick], i) => chart.data.datasets[i].data.push(pick(point)));
      }
      const excess = chart.data.labels.length - HISTORY_POINTS;
      if (excess > 0) {
        chart.data.labels.splice(0, excess);
        chart.data.datasets.forEach((d) => d.data.splice(0, excess));
      }
      CHARTS[name].forEach(([, , , isSlo], i) => { if (isSlo) chart.data.datasets[i].hidden = !sloSet; });
      chart.update("none");
    }
  }

  async function loadHistory() {
    try {
      const response = await fetch("/dashboard/api/history", { headers: { "X-Admin-Token": token() }, cache: "no-store" });
      if (response.ok) addPoints((await response.json()).points);
    } catch (error) {
      // the live feed still draws from now on
    }
    dashboard.historyLoaded = true;
    if (dashboard.snapshot) addPoints([dashboard.snapshot]);
  }

  function loadCharts() {
    if (chartsLoading) return;
    chartsLoading = true;
    const script = el("script", { src: "/dashboard/lib/chart.js" });
    script.onload = async () => {
      dashboard.charts = Object.fromEntries(Object.keys(CHARTS).map((name) => [name, makeChart(name)]));
      await loadHistory();
    };
    script.onerror = () => showBanner($("chart-missing"), "Charts are unavailable: the chart library failed to load from /dashboard/lib/chart.js.");
    document.head.append(script);
  }

  function makeChart(name) {
    Chart.defaults.color = "#c9d1d9";
    Chart.defaults.borderColor = "#30363d";
    const datasets = CHARTS[name].map(([label, color, , dashed]) => ({
      label, data: [], borderColor: color, backgroundColor: color, borderWidth: dashed ? 1.5 : 2,
      borderDash: dashed ? [6, 4] : [], pointRadius: 0, tension: 0, spanGaps: false,
    }));
    const y = { beginAtZero: true, ...(name === "slo" ? { max: 100 } : {}) };
    return new Chart($(`chart-${name}`), {
      type: "line",
      data: { labels: [], datasets },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, interaction: { mode: "index", intersect: false },
        scales: { x: { ticks: { maxTicksLimit: 6, maxRotation: 0 } }, y },
        plugins: { legend: { labels: { boxWidth: 10, boxHeight: 2, filter: (item) => !item.hidden } } },
      },
    });
  }

  // -- start -----------------------------------------------------------------------------------------

  tokenInput.value = sessionStorage.getItem("splitserve-admin-token") || "";
  tokenInput.addEventListener("input", () => sessionStorage.setItem("splitserve-admin-token", tokenInput.value));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect();
  });
  connect();
})();
