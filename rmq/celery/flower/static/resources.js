// rmq's Resources pages in Flower: draw the view the page embeds, then poll its data URL.
// Read-only: this script only sends GET requests to rmq's data URL. Text from workers (hostnames,
// task names, model names) goes into the page as text nodes, never as HTML.
(function () {
  "use strict";

  var HISTORY_S = 600;  // the chart's span: kept in this page's memory only
  var root = document.getElementById("rmq-root");
  if (!root) { return; }
  var mode = root.dataset.mode;
  var pollMs = parseInt(root.dataset.pollMs, 10) || 2000;
  var history = {};  // hostname -> [[epoch s, ratio], ...]

  function el(tag, attrs) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; }
      else if (k === "className") { node.className = attrs[k]; }
      else { node.setAttribute(k, attrs[k]); }
    });
    for (var i = 2; i < arguments.length; i++) {
      var child = arguments[i];
      if (child === null || child === undefined) { continue; }
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else { node.setAttribute(k, attrs[k]); }
    });
    return node;
  }

  function bytes(n) {  // as rmq status writes them: 1.5GiB
    if (n === null || n === undefined) { return "-"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"];
    var v = Number(n), i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? v.toFixed(0) + "B" : v.toFixed(1) + units[i];
  }

  function pct(r) { return r === null || r === undefined ? "-" : Math.round(r * 100) + "%"; }
  function num(v) { return v === null || v === undefined ? "-" : String(v); }

  function ago(s) {
    if (s === null || s === undefined) { return "-"; }
    if (s < 90) { return Math.round(s) + " s ago"; }
    if (s < 5400) { return Math.round(s / 60) + " min ago"; }
    return (s / 3600).toFixed(1) + " h ago";
  }

  function memoryBar(mem) {
    var ratio = mem.ratio || 0;
    var scale = Math.max(1, ratio);  // past the budget the bar rescales so the fill still shows
    var bar = el("div", {className: "rmq-bar", role: "img",
      "aria-label": "memory " + pct(mem.ratio) + " of the budget, zone " + (mem.zone || "-")});
    bar.appendChild(el("div", {className: "rmq-fill rmq-zone-" + (mem.zone || "ok"),
      style: "width:" + (100 * ratio / scale).toFixed(1) + "%"}));
    [["unload", "U"], ["pause", "P"], ["kill", "K"]].forEach(function (pair) {
      var at = (mem.lines || {})[pair[0]];
      if (at === undefined || at === null) { return; }
      var left = (100 * at / scale).toFixed(1) + "%";
      bar.appendChild(el("div", {className: "rmq-line rmq-line-" + pair[0], style: "left:" + left,
        title: pair[0] + " line at " + pct(at) + " of the budget"}));
      bar.appendChild(el("span", {className: "rmq-line-label", style: "left:" + left, text: pair[1]}));
    });
    return el("div", {className: "rmq-memory"}, bar,
      el("div", {className: "rmq-figures",
        text: bytes(mem.worker_bytes) + " of " + bytes(mem.budget_bytes) + " (" + pct(mem.ratio) + "), budget " +
          (mem.budget_source || "-") + ", peak " + bytes(mem.peak_bytes)}));
  }

  function diskCell(disk) {
    if (!disk || disk.total_bytes === null || disk.total_bytes === undefined) { return el("td", {text: "-"}); }
    return el("td", {},
      el("div", {className: "rmq-bar rmq-bar-thin"},
        el("div", {className: "rmq-fill rmq-disk", style: "width:" + (100 * Math.min(1, disk.ratio || 0)).toFixed(1) + "%"})),
      el("div", {className: "rmq-figures", text: bytes(disk.free_bytes) + " free of " + bytes(disk.total_bytes) +
        " (" + pct(disk.ratio) + " used)"}),
      el("div", {className: "rmq-path", text: disk.root || ""}));
  }

  function modelsCell(models) {
    if (!models || !models.length) { return el("td", {className: "rmq-muted", text: "none resident"}); }
    var list = el("ul", {className: "rmq-models"});
    models.forEach(function (proc) {
      list.appendChild(el("li", {}, el("span", {className: "rmq-pid", text: "pid " + proc.pid + ": "}),
        proc.models.map(function (m) {
          return m.name + " " + bytes(m.size_bytes) + (m.pinned ? " (pinned)" : "") + (m.leased ? " (in use)" : "");
        }).join(", ")));
    });
    return el("td", {}, list);
  }

  function countersCell(c) {
    var reasons = Object.keys(c.deferred || {}).sort().map(function (k) { return k + " " + c.deferred[k]; });
    return el("td", {className: "rmq-counters"},
      el("div", {text: "admitted " + num(c.admitted)}),
      el("div", {text: "deferred " + num(c.deferred_total) + (reasons.length ? " (" + reasons.join(", ") + ")" : "")}),
      el("div", {className: c.killed ? "rmq-bad" : "", text: "killed " + num(c.killed)}),
      el("div", {className: c.oom_kills ? "rmq-bad" : "",
        text: "kernel OOM kills " + (c.oom_kills === null || c.oom_kills === undefined ? "- (no cgroup)" : c.oom_kills)}));
  }

  function workerRow(w) {
    var link = el("a", {href: root.dataset.pageUrl + "/" + encodeURIComponent(w.hostname), text: w.hostname});
    if (!w.governed) {
      return el("tr", {"data-worker": w.hostname}, el("td", {}, link),
        el("td", {colspan: "7", className: "rmq-muted", text: w.note || "not governed by rmq"}));
    }
    var zone = w.memory.zone || "-";
    var paused = w.paused ? "paused (" + (w.paused_queues.length ? w.paused_queues.join(", ") : "all queues") + ")" : "no";
    return el("tr", {"data-worker": w.hostname},
      el("td", {}, link, el("div", {className: "rmq-muted", text: "pid " + num(w.pid) + ", " + ago(w.age_s)})),
      el("td", {className: "rmq-col-memory"}, memoryBar(w.memory)),
      el("td", {}, el("span", {className: "rmq-badge rmq-zone-" + zone, text: zone})),
      el("td", {className: w.paused ? "rmq-warn" : "", text: paused}),
      el("td", {text: num(w.cpu.slots_used) + " of " + num(w.cpu.slots) + " in use"}),
      diskCell(w.disk),
      modelsCell(w.models),
      countersCell(w.counters));
  }

  function fill(id, rows, empty) {
    var body = document.getElementById(id);
    if (!body) { return; }
    body.replaceChildren.apply(body, rows.length ? rows : [el("tr", {}, el("td", {colspan: "9", className: "rmq-muted", text: empty}))]);
  }

  function detail(w) {
    if (!w) {  // the worker did not answer this time: its figures are unknown, not empty
      fill("rmq-reservations", [], "the worker did not answer");
      fill("rmq-kills", [], "the worker did not answer");
      return;
    }
    var res = w.reservations || [];
    fill("rmq-reservations", res.map(function (r) {
      var share = r.declared_bytes ? pct(r.used_bytes / r.declared_bytes) : "-";
      return el("tr", {}, el("td", {text: r.task_name || "-"}), el("td", {className: "rmq-id", text: r.task_id || "-"}),
        el("td", {text: r.kind || "-"}), el("td", {text: num(r.pid)}), el("td", {text: bytes(r.declared_bytes)}),
        el("td", {text: bytes(r.used_bytes)}),
        el("td", {className: r.used_bytes > r.declared_bytes ? "rmq-bad" : "", text: share}),
        el("td", {text: num(r.cpu_slots)}), el("td", {text: bytes(r.disk_bytes)}));
    }), "no reservation: nothing governed runs and no model is held");
    var kills = w.recent_kills || [];
    fill("rmq-kills", kills.map(function (k) {
      var when = k.time ? new Date(k.time * 1000).toLocaleTimeString() + " (" + ago(k.ago_s) + ")" : "-";
      return el("tr", {}, el("td", {text: when}), el("td", {text: k.task_name || "-"}),
        el("td", {className: "rmq-id", text: k.task_id || "-"}), el("td", {text: num(k.pid)}),
        el("td", {className: "rmq-bad", text: bytes(k.observed_bytes)}), el("td", {text: bytes(k.declared_bytes)}),
        el("td", {text: bytes(k.worker_bytes)}), el("td", {text: bytes(k.budget_bytes)}));
    }), "no kill since the worker started");
  }

  function record(view) {
    var seen = {};
    view.workers.forEach(function (w) {
      if (!w.governed || w.memory.ratio === null || w.memory.ratio === undefined) { return; }
      seen[w.hostname] = true;
      var points = history[w.hostname] = history[w.hostname] || [];
      if (!points.length || points[points.length - 1][0] < view.time) {  // a cached view is one sample
        points.push([view.time, w.memory.ratio]);
      }
    });
    Object.keys(history).forEach(function (host) {  // a worker that stopped leaves the chart too
      if (!seen[host]) { delete history[host]; return; }
      history[host] = history[host].filter(function (p) { return p[0] >= view.time - HISTORY_S; });
    });
  }

  var COLOURS = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];

  function chart(view) {
    var box = document.getElementById("rmq-chart");
    if (!box) { return; }
    var W = 900, H = 200, L = 44, R = 10, T = 10, B = 24;
    var hosts = Object.keys(history).sort();
    var top = 1;
    hosts.forEach(function (h) { history[h].forEach(function (p) { top = Math.max(top, p[1]); }); });
    top = Math.ceil(top * 10) / 10;
    var now = view.time, first = now;
    hosts.forEach(function (h) { first = Math.min(first, history[h][0][0]); });
    // the span grows with the page's own history, from half a minute up to HISTORY_S
    var span = Math.min(HISTORY_S, Math.max(30, now - first)), from = now - span;
    function x(t) { return L + (W - L - R) * (t - from) / span; }
    function y(r) { return T + (H - T - B) * (1 - r / top); }
    var s = svg("svg", {viewBox: "0 0 " + W + " " + H, class: "rmq-svg", role: "img",
      "aria-label": "memory per worker over the last " + HISTORY_S / 60 + " minutes"});
    for (var r = 0; r <= top + 1e-9; r += 0.25) {
      s.appendChild(svg("line", {x1: L, x2: W - R, y1: y(r), y2: y(r), class: "rmq-grid"}));
      s.appendChild(svg("text", {x: L - 6, y: y(r) + 4, "text-anchor": "end", class: "rmq-axis", text: Math.round(r * 100) + "%"}));
    }
    [0, 1, 2, 3, 4, 5].forEach(function (i) {
      var back = span * i / 5;
      var label = i === 0 ? "now" : span < 300 ? "-" + Math.round(back) + " s" : "-" + (back / 60).toFixed(1) + " min";
      s.appendChild(svg("text", {x: x(now - back), y: H - 6, "text-anchor": "middle", class: "rmq-axis", text: label}));
    });
    var legend = el("div", {className: "rmq-chart-legend"});
    hosts.forEach(function (h, i) {
      var colour = COLOURS[i % COLOURS.length];
      var points = history[h].map(function (p) { return x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1); });
      s.appendChild(svg("polyline", {points: points.join(" "), fill: "none", stroke: colour, "stroke-width": 2}));
      var last = history[h][history[h].length - 1];
      s.appendChild(svg("circle", {cx: x(last[0]), cy: y(last[1]), r: 3.5, fill: colour}));
      legend.appendChild(el("span", {className: "rmq-key"}, el("span", {className: "rmq-swatch", style: "background:" + colour}),
        h + " " + pct(last[1])));
    });
    box.replaceChildren(s, legend);
  }

  function show(view) {
    var errors = document.getElementById("rmq-errors");
    errors.hidden = !view.errors.length;
    errors.textContent = view.errors.join("; ");
    fill("rmq-rows", view.workers.map(workerRow), "no worker answered");
    var empty = document.getElementById("rmq-empty");
    if (empty) { empty.hidden = view.workers.length > 0; }
    if (mode === "worker") { detail(view.workers[0]); }
    record(view);
    chart(view);
    document.getElementById("rmq-updated").textContent = "updated " + new Date(view.time * 1000).toLocaleTimeString() +
      ", " + view.workers.length + (view.workers.length === 1 ? " worker" : " workers") + ", refreshing every " +
      pollMs / 1000 + " s";
    document.getElementById("rmq-dot").className = "rmq-dot" + (view.errors.length ? " rmq-dot-bad" : " rmq-dot-ok");
  }

  function poll() {
    // against the origin: a page opened as http://user:password@host/... makes relative URLs carry the
    // credentials, which fetch refuses; the browser still sends the Basic auth it used for the page
    fetch(new URL(root.dataset.url, window.location.origin), {credentials: "same-origin",
      headers: {"Accept": "application/json"}})
      .then(function (resp) {
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.json();
      })
      .then(function (view) {
        show(view);
        root.dataset.polls = String((parseInt(root.dataset.polls, 10) || 0) + 1);  // refreshes so far
      })
      .catch(function (err) {
        var errors = document.getElementById("rmq-errors");
        errors.hidden = false;
        errors.textContent = "could not refresh: " + err.message;
        document.getElementById("rmq-dot").className = "rmq-dot rmq-dot-bad";
      })
      .finally(function () { setTimeout(poll, pollMs); });
  }

  document.getElementById("rmq-history-span").textContent = String(HISTORY_S / 60) + " minutes";
  show(JSON.parse(document.getElementById("rmq-initial").textContent));
  setTimeout(poll, pollMs);
})();
