// Airlock web UI: the only script. Pages work without it; it adds live
// refresh of [data-live] regions, copy buttons and jumping to a policy line.
(function () {
  "use strict";

  function schedule(el) {
    var every = parseInt(el.getAttribute("data-every") || "5", 10);
    setTimeout(function () { refresh(el); }, Math.max(every, 2) * 1000);
  }

  function refresh(el) {
    if (!document.body.contains(el)) return;
    if (document.hidden) { schedule(el); return; }
    fetch(el.getAttribute("data-live"), {
      headers: { "X-Airlock-Live": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (r) {
      if (r.status === 401) {
        var here = location.pathname + location.search;
        location.href = "/login?ended=1&next=" + encodeURIComponent(here);
        return null;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (html) {
      if (html === null) return;
      var t = document.createElement("template");
      t.innerHTML = html;
      var fresh = t.content.firstElementChild;
      if (!fresh) { schedule(el); return; }
      el.replaceWith(fresh);
      wire(fresh);
      schedule(fresh);
    }).catch(function () {
      el.classList.add("stale");
      schedule(el);
    });
  }

  function wire(root) {
    root.querySelectorAll("button[data-copy]").forEach(function (b) {
      b.hidden = false;
      b.addEventListener("click", function () {
        var src = document.getElementById(b.getAttribute("data-copy"));
        if (!src || !navigator.clipboard) return;
        navigator.clipboard.writeText(src.value || src.textContent).then(function () {
          b.textContent = "Copied";
        });
      });
    });
    root.querySelectorAll("a[data-line]").forEach(function (a) {
      a.addEventListener("click", function (e) {
        var ta = document.getElementById("policy-text");
        if (!ta) return;
        e.preventDefault();
        var n = parseInt(a.getAttribute("data-line"), 10);
        var lines = ta.value.split("\n");
        var pos = 0;
        for (var i = 0; i < n - 1 && i < lines.length; i++) pos += lines[i].length + 1;
        ta.focus();
        ta.setSelectionRange(pos, pos + (lines[n - 1] || "").length);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    wire(document);
    document.querySelectorAll("[data-live]").forEach(schedule);
  });
})();
