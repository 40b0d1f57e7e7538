/* Circuit viewer: the interactive half of viz/html.py.
 *
 * The page embeds the circuit as columnar JSON (#sfc-data). This script keeps a
 * small state (thresholds, selected node, labels, flags) and redraws the whole
 * graph from it with Plotly.react: 6 edge traces (sign x width bucket), one
 * trace of dimmed edges and one node trace. Building those arrays for 20,000
 * edges takes a few milliseconds, so every interaction is "change state,
 * render()".
 *
 * Data never goes through innerHTML: every string from the circuit is written
 * with textContent (or as an attribute value).
 */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("sfc-data").textContent);
  var N = D.nodes, E = D.edges, S = D.style;
  var nN = N.id.length, nE = E.src.length;
  var DIM = 0.12;

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined) return "–";
    return Number(v).toPrecision(digits || 4);
  }
  function signed(v) { return (v >= 0 ? "+" : "") + fmt(v); }

  if (D.empty) { window.sfcViewer = { empty: true }; return; }

  // ------------------------------------------------------------------ state
  var isMetric = N.kind.map(function (k) { return k === "metric"; });
  var absEff = N.effect.map(Math.abs);
  var absW = E.w.map(Math.abs);
  var labels = {};            // feature key -> human label (from the file, or typed in the page)
  N.key.forEach(function (k, i) { if (k && N.label[i] && !(k in labels)) labels[k] = N.label[i]; });
  var autoLabels = D.autoLabels || {};  // feature key -> automatic label, read off its dashboard
  var flagged = {};           // feature key -> true
  var state = { nodeT: 0, edgeT: 0, selected: -1, showLabels: true };
  var outE = [], inE = [];
  for (var i = 0; i < nN; i++) { outE.push([]); inE.push([]); }
  for (var e = 0; e < nE; e++) { outE[E.src[e]].push(e); inE[E.dst[e]].push(e); }

  function labelOf(i) { return N.key[i] ? (labels[N.key[i]] || autoLabels[N.key[i]] || "") : (N.label[i] || ""); }
  // True when node i shows an automatic label (no human one).
  function isAuto(i) { var k = N.key[i]; return !!(k && !labels[k] && autoLabels[k]); }
  function tokenAt(p) {
    var t = D.meta.prompt_tokens;
    return (t && p !== null && p !== undefined && p < t.length) ? t[p] : null;
  }

  function visibleNodes() {
    var v = new Uint8Array(nN);
    for (var i = 0; i < nN; i++) v[i] = (isMetric[i] || absEff[i] >= state.nodeT) ? 1 : 0;
    return v;
  }
  function visibleEdges(nv) {
    var v = new Uint8Array(nE);
    for (var e = 0; e < nE; e++) v[e] = (nv[E.src[e]] && nv[E.dst[e]] && absW[e] >= state.edgeT) ? 1 : 0;
    return v;
  }
  // The selected node, its ancestors and its descendants along shown edges.
  function related(root, ev) {
    var mark = new Uint8Array(nN);
    mark[root] = 1;
    [[inE, E.src], [outE, E.dst]].forEach(function (dir) {
      var stack = [root], seen = new Uint8Array(nN);
      seen[root] = 1;
      while (stack.length) {
        var u = stack.pop(), list = dir[0][u];
        for (var j = 0; j < list.length; j++) {
          var e = list[j];
          if (!ev[e]) continue;
          var w = dir[1][e];
          if (!seen[w]) { seen[w] = 1; mark[w] = 1; stack.push(w); }
        }
      }
    });
    return mark;
  }

  // ------------------------------------------------------------------ drawing
  // Plotly draws the axes, row and token labels, the colour bar, and handles
  // pan and zoom; nodes and edges are painted on a canvas laid over the plot
  // area, because SVG with 20,000 edge segments takes seconds per redraw and a
  // canvas takes milliseconds. Hover and click find the nearest painted node.
  var gd = el("div", { id: "sfc-plot" });
  var canvas = el("canvas", { id: "sfc-canvas" });
  var layout = D.layout;
  layout.uirevision = "keep";
  layout.autosize = true;
  var config = { displaylogo: false, responsive: true, scrollZoom: true, doubleClick: "reset",
                 modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
  var last = { nv: null, ev: null, mark: null, px: null, py: null, order: [], drawn: [] };
  var stops = S.colorscale.map(function (s) {
    var h = s[1];
    return [s[0], parseInt(h.substr(1, 2), 16), parseInt(h.substr(3, 2), 16), parseInt(h.substr(5, 2), 16)];
  });
  function colorOf(v) {
    var t = Math.max(0, Math.min(1, (v / S.maxAbsEffect + 1) / 2));
    for (var k = 1; k < stops.length; k++) {
      if (t <= stops[k][0]) {
        var a = stops[k - 1], b = stops[k], u = (t - a[0]) / ((b[0] - a[0]) || 1);
        return "rgb(" + Math.round(a[1] + u * (b[1] - a[1])) + "," + Math.round(a[2] + u * (b[2] - a[2])) +
               "," + Math.round(a[3] + u * (b[3] - a[3])) + ")";
      }
    }
    return S.colorscale[stops.length - 1][1];
  }
  var fill = N.effect.map(colorOf);

  // Axes only: one invisible trace spans the nodes and carries the colour bar.
  var frame = [{
    type: "scatter", mode: "markers", name: "frame", hoverinfo: "skip", x: N.x, y: N.y,
    marker: { size: 1, opacity: 0, color: N.effect, colorscale: S.colorscale, cmin: -S.maxAbsEffect,
              cmax: S.maxAbsEffect, showscale: true,
              colorbar: { title: { text: "effect" }, thickness: 10, len: 160, lenmode: "pixels", y: 1, yanchor: "top" } }
  }];

  function compute() {
    var nv = visibleNodes(), ev = visibleEdges(nv);
    var mark = state.selected >= 0 ? related(state.selected, ev) : null;
    last.nv = nv; last.ev = ev; last.mark = mark;
  }

  function shape(ctx, sym, x, y, s) {
    var r = s / 2;
    ctx.beginPath();
    if (sym === "triangle-up") {
      ctx.moveTo(x, y - r * 1.15); ctx.lineTo(x + r * 1.1, y + r * 0.75); ctx.lineTo(x - r * 1.1, y + r * 0.75);
      ctx.closePath();
    } else if (sym === "diamond") {
      ctx.moveTo(x, y - r * 1.3); ctx.lineTo(x + r * 1.3, y); ctx.lineTo(x, y + r * 1.3); ctx.lineTo(x - r * 1.3, y);
      ctx.closePath();
    } else {
      ctx.rect(x - r, y - r, s, s);
    }
  }

  function paint() {
    var fl = gd._fullLayout;
    if (!fl || !fl.xaxis) return;
    var xa = fl.xaxis, ya = fl.yaxis, ratio = window.devicePixelRatio || 1;
    var W = fl.width, H = fl.height;
    if (canvas.width !== Math.round(W * ratio) || canvas.height !== Math.round(H * ratio)) {
      canvas.width = Math.round(W * ratio); canvas.height = Math.round(H * ratio);
      canvas.style.width = W + "px"; canvas.style.height = H + "px";
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.save();
    ctx.beginPath(); ctx.rect(xa._offset, ya._offset, xa._length, ya._length); ctx.clip();
    var px = new Float64Array(nN), py = new Float64Array(nN);
    for (var i = 0; i < nN; i++) { px[i] = xa._offset + xa.l2p(N.x[i]); py[i] = ya._offset + ya.l2p(N.y[i]); }
    last.px = px; last.py = py;
    var nv = last.nv, ev = last.ev, mark = last.mark;
    // Edges: dimmed first, then thin to thick, each bucket one path.
    var paths = [];
    for (var b = 0; b < 7; b++) paths.push([]);
    for (var e = 0; e < nE; e++) {
      if (!ev[e]) continue;
      var s = E.src[e], d = E.dst[e];
      paths[(mark && !(mark[s] && mark[d])) ? 6 : (E.w[e] >= 0 ? 0 : 3) + E.bucket[e]].push(e);
    }
    [6, 0, 3, 1, 4, 2, 5].forEach(function (k) {
      if (!paths[k].length) return;
      ctx.beginPath();
      paths[k].forEach(function (e) { ctx.moveTo(px[E.src[e]], py[E.src[e]]); ctx.lineTo(px[E.dst[e]], py[E.dst[e]]); });
      ctx.strokeStyle = k === 6 ? "rgba(150,150,150,0.12)" : (k < 3 ? S.edgeColors.pos : S.edgeColors.neg);
      ctx.lineWidth = k === 6 ? 0.6 : S.edgeWidths[k % 3];
      ctx.stroke();
    });
    // Nodes: dimmed ones under lit ones.
    var order = [];
    for (i = 0; i < nN; i++) if (nv[i] && mark && !mark[i]) order.push(i);
    for (i = 0; i < nN; i++) if (nv[i] && !(mark && !mark[i])) order.push(i);
    order.forEach(function (i) {
      var f = N.key[i] && flagged[N.key[i]];
      ctx.globalAlpha = mark && !mark[i] ? DIM : 1;
      shape(ctx, N.symbol[i], px[i], py[i], N.size[i]);
      ctx.fillStyle = fill[i]; ctx.fill();
      ctx.lineWidth = i === state.selected ? 3 : (f ? 2.5 : 0.8);
      ctx.strokeStyle = i === state.selected ? "#ff8800" : (f ? "#000000" : "#555555");
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
    last.drawn = state.showLabels ? paintLabels(ctx, order, px, py, mark) : [];
    ctx.restore();
    last.order = order;
  }

  // Labels beside feature nodes: the largest |effect| first, each truncated to
  // LABEL_CHARS, and one that would overlap a label already drawn is skipped
  // (a coarse grid of the drawn boxes keeps this linear in the number of nodes).
  // Error nodes and the metric keep their symbols only.
  var LABEL_CHARS = 24, LABEL_FONT = "11px system-ui, sans-serif", LABEL_H = 13;
  function shortLabel(i) {
    var t = labelOf(i);
    return t.length > LABEL_CHARS ? t.slice(0, LABEL_CHARS - 1) + "…" : t;
  }
  function paintLabels(ctx, order, px, py, mark) {
    var todo = order.filter(function (i) { return N.key[i] && labelOf(i) && !(mark && !mark[i]); });
    todo.sort(function (a, b) { return absEff[b] - absEff[a]; });
    var grid = {}, CW = 120, drawn = [];
    function cells(x0, y0, x1, y1, fn) {
      for (var gx = Math.floor(x0 / CW); gx <= Math.floor(x1 / CW); gx++)
        for (var gy = Math.floor(y0 / LABEL_H); gy <= Math.floor(y1 / LABEL_H); gy++)
          if (fn(gx + ":" + gy)) return true;
      return false;
    }
    ctx.textBaseline = "middle";
    ctx.lineJoin = "round";
    todo.forEach(function (i) {
      var text = shortLabel(i), auto = isAuto(i);
      ctx.font = (auto ? "italic " : "") + LABEL_FONT;
      var x0 = px[i] + N.size[i] / 2 + 3, w = ctx.measureText(text).width;
      var box = [x0, py[i] - LABEL_H / 2, x0 + w, py[i] + LABEL_H / 2];
      var hit = cells(box[0], box[1], box[2], box[3], function (c) {
        return (grid[c] || []).some(function (b) {
          return b[0] < box[2] && box[0] < b[2] && b[1] < box[3] && box[1] < b[3];
        });
      });
      if (hit) return;
      cells(box[0], box[1], box[2], box[3], function (c) { (grid[c] = grid[c] || []).push(box); return false; });
      ctx.lineWidth = 3; ctx.strokeStyle = "rgba(255,255,255,0.85)";
      ctx.strokeText(text, x0, py[i]);
      ctx.fillStyle = auto ? "#555555" : "#111111";
      ctx.fillText(text, x0, py[i]);
      drawn.push({ id: N.id[i], text: text, auto: auto, box: box });
    });
    return drawn;
  }

  // The node under a point of the page (client coordinates), or -1.
  function nodeAt(cx, cy) {
    if (!last.px) return -1;
    var r = canvas.getBoundingClientRect(), x = cx - r.left, y = cy - r.top, best = -1, bestD = Infinity;
    for (var k = 0; k < last.order.length; k++) {
      var i = last.order[k], dx = last.px[i] - x, dy = last.py[i] - y, dd = dx * dx + dy * dy;
      var reach = Math.max(8, N.size[i] / 2 + 3);
      if (dd <= reach * reach && dd <= bestD) { best = i; bestD = dd; }
    }
    return best;
  }

  var pending = false, plotted = null;
  function render() {
    pending = false;
    var t0 = performance.now();
    compute();
    if (!plotted) plotted = Promise.resolve(Plotly.newPlot(gd, frame, layout, config));
    return plotted.then(function () {
      paint();
      updateStatus();
      api.lastRenderMs = performance.now() - t0;
      api.renders += 1;
    });
  }
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(render);
  }

  // ------------------------------------------------------------------ header controls
  var header = document.getElementById("sfc-header");
  var controls = el("div", { id: "sfc-controls" });
  header.appendChild(controls);

  function positives(arr, keep) {
    var out = [];
    for (var i = 0; i < arr.length; i++) if (arr[i] > 0 && (!keep || keep[i])) out.push(arr[i]);
    return out;
  }
  function sliderGroup(name, title, values) {
    // Log scale between the smallest and largest non-zero magnitude; 0 shows everything.
    var pos = positives(values);
    var hi = pos.length ? Math.log10(Math.max.apply(null, pos)) : 0;
    var lo = pos.length ? Math.log10(Math.min.apply(null, pos)) : hi - 1;
    if (hi - lo < 1e-9) lo = hi - 1;
    var box = el("label", { class: "sfc-slider" });
    box.appendChild(el("span", null, title));
    var range = el("input", { id: "sfc-" + name + "-slider", type: "range", min: "0", max: "1000", step: "1", value: "0" });
    var num = el("input", { id: "sfc-" + name + "-value", type: "number", min: "0", step: "any", value: "0" });
    box.appendChild(range); box.appendChild(num);
    controls.appendChild(box);
    function toT(v) { return v <= 0 ? 0 : Math.pow(10, lo + (hi - lo) * v / 1000); }
    function toV(t) { return t <= 0 ? 0 : Math.max(1, Math.min(1000, Math.round(1000 * (Math.log10(t) - lo) / (hi - lo)))); }
    function set(t) {
      state[name === "node" ? "nodeT" : "edgeT"] = t;
      range.setAttribute("data-threshold", String(t));
      schedule();
    }
    range.addEventListener("input", function () {
      var t = toT(Number(range.value));
      num.value = t === 0 ? "0" : t.toPrecision(3);
      set(t);
    });
    num.addEventListener("change", function () {
      var t = Math.max(0, Number(num.value) || 0);
      range.value = String(toV(t));
      set(t);
    });
    range.setAttribute("data-threshold", "0");
  }
  sliderGroup("node", "node |effect| ≥", N.effect.filter(function (_, i) { return !isMetric[i]; }));
  sliderGroup("edge", "edge |weight| ≥", E.w);

  var searchBox = el("div", { class: "sfc-search" });
  var search = el("input", { id: "sfc-search", type: "search", placeholder: "find node by id or label", autocomplete: "off" });
  var results = el("ul", { id: "sfc-results" });
  searchBox.appendChild(search); searchBox.appendChild(results);
  controls.appendChild(searchBox);

  var toggle = el("label", { class: "sfc-toggle" });
  var toggleBox = el("input", { id: "sfc-labels-toggle", type: "checkbox" });
  toggleBox.checked = state.showLabels;
  toggleBox.addEventListener("change", function () { state.showLabels = toggleBox.checked; paint(); });
  toggle.appendChild(toggleBox);
  toggle.appendChild(el("span", null, " labels on graph"));
  controls.appendChild(toggle);

  var download = el("button", { id: "sfc-download", type: "button" }, "download labels & flags");
  controls.appendChild(download);
  var status = el("span", { id: "sfc-status" });
  controls.appendChild(status);
  var legend = el("div", { id: "sfc-legend" },
    "■ feature   ▲ SAE error   ◆ metric   colour: effect (blue +, red −)   size: |effect|   edges: blue +, red −" +
    "   labels: human, or italic = automatic");
  header.appendChild(legend);

  function updateStatus() {
    var n = 0, m = 0, f = Object.keys(flagged).length;
    for (var i = 0; i < nN; i++) n += (last.nv[i] && !isMetric[i]) ? 1 : 0;
    for (var e = 0; e < nE; e++) m += last.ev[e];
    status.setAttribute("data-nodes", String(n));
    status.setAttribute("data-edges", String(m));
    status.textContent = n + " nodes · " + m + " edges shown · " + f + " flagged";
  }

  // ------------------------------------------------------------------ tooltip
  var tip = el("div", { id: "sfc-tooltip", role: "tooltip" });
  tip.hidden = true;
  document.body.appendChild(tip);
  function nodeFacts(i) {
    var rows = [["site", N.site[i]]];
    if (!isMetric[i]) rows.push(["feature", N.error[i] ? "ε (SAE error)" : N.feature[i]]);
    if (N.position[i] !== null && N.position[i] !== undefined) {
      var tok = tokenAt(N.position[i]);
      rows.push(["position", N.position[i] + (tok !== null ? "  " + JSON.stringify(tok) : "")]);
    }
    rows.push(["label", labelOf(i) || "–", isAuto(i)]);
    rows.push(["effect", signed(N.effect[i])]);
    rows.push(["activation", fmt(N.activation[i])]);
    return rows;
  }
  function factTable(i) {
    var table = el("table", { class: "sfc-facts" });
    nodeFacts(i).forEach(function (r) {
      var tr = el("tr", { "data-field": r[0] });
      tr.appendChild(el("th", null, r[0]));
      if (r[2]) {  // an automatic label: italic, with a tag
        var td = el("td", { class: "sfc-auto" });
        td.appendChild(el("span", { class: "sfc-auto-label" }, r[1]));
        td.appendChild(el("span", { class: "sfc-auto-tag", title: "automatic label, read off the dashboard: " +
          "the tokens the feature fires on → the tokens it promotes. Edit it in the panel." }, "auto"));
        tr.appendChild(td);
      } else {
        tr.appendChild(el("td", null, r[1]));
      }
      table.appendChild(tr);
    });
    return table;
  }
  function showTip(i, ev) {
    tip.replaceChildren(el("div", { class: "sfc-tip-id" }, N.id[i]), factTable(i));
    tip.hidden = false;
    var x = (ev && ev.clientX) || 0, y = (ev && ev.clientY) || 0;
    var w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(x + 14, window.innerWidth - w - 4) + "px";
    tip.style.top = Math.min(y + 14, window.innerHeight - h - 4) + "px";
  }
  function hideTip() { tip.hidden = true; }

  // ------------------------------------------------------------------ side panel
  var main = document.getElementById("sfc-main");
  main.appendChild(gd);
  var panel = el("aside", { id: "sfc-panel" });
  panel.hidden = true;
  main.appendChild(panel);

  function section(title) {
    var s = el("section"); s.appendChild(el("h3", null, title)); return s;
  }
  function contextsView(dash) {
    var s = section("Top-activating contexts");
    var max = 0;
    dash.contexts.forEach(function (c) { c.acts.forEach(function (a) { if (a > max) max = a; }); });
    dash.contexts.forEach(function (c) {
      var line = el("div", { class: "sfc-context" });
      c.tokens.forEach(function (tok, j) {
        var a = c.acts[j] || 0;
        var span = el("span", { class: "sfc-tok", title: "activation " + fmt(a, 3) },
                      String(tok).replace(/\n/g, "↵"));
        if (a > 0 && max > 0) span.style.backgroundColor = "rgba(255,140,0," + (0.1 + 0.9 * a / max).toFixed(3) + ")";
        line.appendChild(span);
      });
      s.appendChild(line);
    });
    if (!dash.contexts.length) s.appendChild(el("p", { class: "sfc-muted" }, "no contexts"));
    return s;
  }
  // Activation histogram: bars of the non-zero activations over the corpus tokens read.
  function histogramView(dash) {
    var h = dash.histogram, s = section("Activation histogram");
    var counts = h.counts || [], top = Math.max.apply(null, counts.concat([1]));
    var chart = el("div", { class: "sfc-hist" });
    counts.forEach(function (c, b) {
      var bar = el("div", { class: "sfc-hist-bar",
        title: fmt(h.edges[b], 3) + "–" + fmt(h.edges[b + 1], 3) + ": " + c + " tokens" });
      bar.style.height = (100 * c / top).toFixed(1) + "%";
      chart.appendChild(bar);
    });
    s.appendChild(chart);
    var axis = el("div", { class: "sfc-hist-axis" });
    axis.appendChild(el("span", null, "0"));
    axis.appendChild(el("span", null, fmt(h.edges[h.edges.length - 1], 3)));
    s.appendChild(axis);
    if (dash.density !== undefined) {
      s.appendChild(el("p", { class: "sfc-muted" }, "active on " + (100 * dash.density).toPrecision(3) + "% of " +
        (dash.n_tokens || "?") + " corpus tokens"));
    }
    return s;
  }
  function tokenList(title, items, cls) {
    var s = section(title);
    var ul = el("ul", { class: "sfc-logits " + cls });
    (items || []).forEach(function (t) {
      var li = el("li");
      li.appendChild(el("code", null, JSON.stringify(t.token)));
      li.appendChild(el("span", { class: "sfc-val" }, signed(t.value)));
      ul.appendChild(li);
    });
    s.appendChild(ul);
    return s;
  }
  function edgeList(title, list, endOf) {
    var s = section(title);
    var items = list.filter(function (e) { return last.ev[e]; })
                    .sort(function (a, b) { return absW[b] - absW[a]; }).slice(0, 8);
    var ul = el("ul", { class: "sfc-edges" });
    items.forEach(function (e) {
      var j = endOf[e];
      var li = el("li");
      var a = el("a", { href: "#", "data-node": N.id[j] }, N.id[j]);
      a.addEventListener("click", function (ev) { ev.preventDefault(); select(j); });
      li.appendChild(a);
      if (labelOf(j)) li.appendChild(el("span", { class: "sfc-muted" }, " " + labelOf(j)));
      li.appendChild(el("span", { class: "sfc-val " + (E.w[e] >= 0 ? "pos" : "neg") }, signed(E.w[e])));
      ul.appendChild(li);
    });
    if (!items.length) ul.appendChild(el("li", { class: "sfc-muted" }, "none shown"));
    s.appendChild(ul);
    return s;
  }
  function fillPanel(i) {
    panel.replaceChildren();
    var head = el("div", { class: "sfc-panel-head" });
    head.appendChild(el("h2", { id: "sfc-panel-title" }, N.id[i]));
    var close = el("button", { type: "button", id: "sfc-close", title: "clear selection (Esc)" }, "×");
    close.addEventListener("click", clearSelection);
    head.appendChild(close);
    panel.appendChild(head);
    if (!last.nv[i]) panel.appendChild(el("p", { class: "sfc-muted" }, "Hidden at the current node threshold."));
    panel.appendChild(factTable(i));
    var key = N.key[i];
    if (key) {
      var edit = el("label", { class: "sfc-edit" });
      edit.appendChild(el("span", null, "label"));
      var input = el("input", { id: "sfc-label-input", type: "text", placeholder: "describe this feature" });
      // An automatic label starts in the box (italic) so that it can be kept, edited or replaced.
      input.value = labels[key] || autoLabels[key] || "";
      if (!labels[key] && autoLabels[key]) {
        input.classList.add("sfc-auto-label");
        input.setAttribute("title", "automatic label: type to replace it");
      }
      input.addEventListener("input", function () { input.classList.remove("sfc-auto-label"); });
      input.addEventListener("change", function () { setLabel(key, input.value); });
      input.addEventListener("keydown", function (ev) { if (ev.key === "Enter") input.blur(); ev.stopPropagation(); });
      edit.appendChild(input);
      panel.appendChild(edit);
      var flag = el("label", { class: "sfc-flag" });
      var box = el("input", { id: "sfc-flag-input", type: "checkbox" });
      box.checked = !!flagged[key];
      box.addEventListener("change", function () { setFlag(key, box.checked); });
      flag.appendChild(box);
      flag.appendChild(el("span", null, " flag " + key + " for SHIFT (spurious)"));
      panel.appendChild(flag);
      var dash = D.dashboards[key];
      if (dash) {
        panel.appendChild(contextsView(dash));
        panel.appendChild(tokenList("Promoted tokens", dash.promoted, "pos"));
        panel.appendChild(tokenList("Suppressed tokens", dash.suppressed, "neg"));
        if (dash.histogram) panel.appendChild(histogramView(dash));
      } else {
        panel.appendChild(el("p", { class: "sfc-muted" },
          "No dashboard for this feature: make the page with `sfc view CIRCUIT --dashboards auto`."));
      }
    } else if (N.error[i]) {
      panel.appendChild(el("p", { class: "sfc-muted" },
        "The SAE error at this site: what the dictionary fails to reconstruct. It has no dashboard."));
    }
    panel.appendChild(edgeList("Strongest inputs", inE[i], E.src));
    panel.appendChild(edgeList("Strongest outputs", outE[i], E.dst));
    if (panel.hidden) { panel.hidden = false; resize(); }
  }
  // The panel takes width from the graph: tell plotly, which then repaints the canvas.
  function resize() { if (gd._fullLayout) Plotly.Plots.resize(gd); }

  function select(i) {
    state.selected = i;
    hideTip();
    var p = render();
    fillPanel(i);
    return p;
  }
  function clearSelection() {
    state.selected = -1;
    if (!panel.hidden) { panel.hidden = true; resize(); }
    panel.replaceChildren();
    hideTip();
    return render();
  }
  function setLabel(key, text) {
    labels[key] = text.trim();  // an empty label falls back to the automatic one
    if (state.selected >= 0) fillPanel(state.selected);
    schedule();
  }
  function setFlag(key, on) {
    if (on) flagged[key] = true; else delete flagged[key];
    schedule();
  }

  // ------------------------------------------------------------------ search
  function findNodes(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    var out = [];
    for (var i = 0; i < nN && out.length < 30; i++) {
      if (N.id[i].toLowerCase().indexOf(q) >= 0 || labelOf(i).toLowerCase().indexOf(q) >= 0) out.push(i);
    }
    return out;
  }
  function showResults() {
    var found = findNodes(search.value);
    results.replaceChildren();
    found.forEach(function (i) {
      var li = el("li", { "data-node": N.id[i] }, N.id[i] + (labelOf(i) ? " — " + labelOf(i) : ""));
      li.addEventListener("mousedown", function (ev) { ev.preventDefault(); pick(i); });
      results.appendChild(li);
    });
    results.hidden = !found.length;
    return found;
  }
  function pick(i) { results.hidden = true; search.blur(); select(i); }
  search.addEventListener("input", showResults);
  search.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") { var f = showResults(); if (f.length) pick(f[0]); }
    if (ev.key === "Escape") { search.value = ""; results.hidden = true; search.blur(); }
    ev.stopPropagation();
  });
  search.addEventListener("blur", function () { results.hidden = true; });
  results.hidden = true;

  // ------------------------------------------------------------------ download
  function flagsDocument() {
    var lab = {};
    Object.keys(labels).sort().forEach(function (k) { if (labels[k]) lab[k] = labels[k]; });
    return { format: "sfc-feature-flags", version: 1, model: D.meta.model, task: D.meta.task,
             dictionaries: D.meta.dictionaries || {},
             labels: lab, flagged: Object.keys(flagged).sort() };
  }
  download.addEventListener("click", function () {
    var blob = new Blob([JSON.stringify(flagsDocument(), null, 2)], { type: "application/json" });
    var a = el("a", { href: URL.createObjectURL(blob),
                      download: String(D.meta.task || "circuit").replace(/[^A-Za-z0-9_.-]+/g, "_") + "-labels-flags.json" });
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 0);
  });

  // ------------------------------------------------------------------ events
  document.addEventListener("keydown", function (ev) {
    if (ev.key === "Escape") clearSelection();
  });

  var api = {
    state: state, renders: 0, lastRenderMs: null,
    select: select, selectId: function (id) { return select(N.id.indexOf(id)); }, clearSelection: clearSelection, render: render, flagsDocument: flagsDocument,
    visibleNodeIds: function () { return N.id.filter(function (_, i) { return last.nv[i]; }); },
    drawnLabels: function () { return last.drawn.slice(); },
    labelOf: function (id) { var i = N.id.indexOf(id); return i < 0 ? null : { text: labelOf(i), auto: isAuto(i) }; },
    litNodeIds: function () {
      return N.id.filter(function (_, i) { return last.nv[i] && (!last.mark || last.mark[i]); });
    }
  };
  window.sfcViewer = api;

  api.nodeClientXY = function (id) {
    var i = N.id.indexOf(id), r = canvas.getBoundingClientRect();
    return i < 0 || !last.px ? null : [r.left + last.px[i], r.top + last.py[i]];
  };
  api.nodeStyle = function (id) {
    var i = N.id.indexOf(id);
    if (i < 0) return null;
    return { visible: !!last.nv[i], opacity: last.mark && !last.mark[i] ? DIM : 1 };
  };

  api.ready = render().then(function () {
    // The canvas sits above plotly's grid and below its hover layer; pan and zoom
    // events still reach plotly because the canvas ignores the pointer.
    var svg = gd.querySelector(".svg-container .main-svg");
    svg.parentNode.insertBefore(canvas, svg.nextSibling);
    gd.on("plotly_afterplot", paint);
    gd.on("plotly_relayouting", paint);
    paint();
    var down = null, dragging = false;
    gd.addEventListener("mousemove", function (ev) {
      if (dragging) return;
      var i = nodeAt(ev.clientX, ev.clientY);
      gd.style.cursor = i >= 0 ? "pointer" : "";
      if (i >= 0) showTip(i, ev); else hideTip();
    });
    gd.addEventListener("mouseleave", hideTip);
    // Plotly covers the page while a drag is in progress, so listen on the document.
    document.addEventListener("mousedown", function (ev) {
      if (gd.contains(ev.target)) { down = [ev.clientX, ev.clientY]; dragging = true; }
    }, true);
    document.addEventListener("mouseup", function (ev) {
      dragging = false;
      if (!down) return;
      var moved = Math.abs(ev.clientX - down[0]) + Math.abs(ev.clientY - down[1]);
      down = null;
      if (moved > 4) return;
      var i = nodeAt(ev.clientX, ev.clientY);
      if (i >= 0) select(i);
    }, true);
    document.body.setAttribute("data-ready", "1");
  });
})();
