// flowprobe's page: everything works without this file (the form, sorting,
// the tabs and the drill-down are links rendered by the agent). It adds
// auto-refresh with a pause, and a side panel for a row's connections.
// It only ever asks the agent that served it, and inserts nothing but
// nodes parsed from the agent's own (escaped) HTML.
"use strict";
(function () {
  var body = document.body;
  var every = parseInt(body.getAttribute("data-refresh"), 10) || 0;
  var paused = false;
  var pause = document.getElementById("pause");
  var status = document.getElementById("status");
  var panel = document.getElementById("panel");
  var panelBody = document.getElementById("panel-body");

  function say(text) { status.textContent = text; }

  function fetchPage(url) {
    return fetch(url, { credentials: "same-origin" }).then(function (r) {
      return r.text().then(function (t) {
        return new DOMParser().parseFromString(t, "text/html");
      });
    });
  }

  function refresh() {
    if (paused || document.hidden) return;
    fetchPage(location.href).then(function (doc) {
      var fresh = doc.getElementById("data");
      var data = document.getElementById("data");
      if (!fresh || !data) return;
      data.replaceChildren.apply(data, Array.prototype.map.call(fresh.childNodes, function (n) {
        return document.importNode(n, true);
      }));
      say("updated " + new Date().toLocaleTimeString());
    }).catch(function (e) { say("refresh failed: " + e); });
  }

  if (every > 0) {
    pause.hidden = false;
    pause.addEventListener("click", function () {
      paused = !paused;
      pause.textContent = paused ? "resume" : "pause";
      say(paused ? "paused" : "");
      if (!paused) refresh();
    });
    setInterval(refresh, every * 1000);
  }

  // A row's connections in the side panel (the link still opens them as
  // a page: middle click, or without this file).
  document.addEventListener("click", function (ev) {
    if (ev.button !== 0 || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
    var tr = ev.target.closest("#rows tr.drill");
    if (!tr || ev.target.closest("a:not(.drill)")) return;
    ev.preventDefault();
    var url = tr.querySelector("a.drill").getAttribute("href");
    fetchPage(url).then(function (doc) {
      var shown = document.importNode(doc.getElementById("rows") || doc.getElementById("error") || doc.createElement("p"), true);
      shown.removeAttribute("id");
      shown.classList.add("connections");
      var open = document.createElement("a");
      open.href = url;
      open.textContent = "open as a page";
      panelBody.replaceChildren(open, shown);
      panel.hidden = false;
    }).catch(function (e) { say("connections failed: " + e); });
  });
  document.getElementById("close").addEventListener("click", function () {
    panel.hidden = true;
  });

  // First render done: what bench/README.md's figure reads.
  window.flowprobeRendered = performance.now();
})();
