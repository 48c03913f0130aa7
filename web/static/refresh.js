// Re-render the live part of a page from its server-side partial, once a second.
(function () {
  const box = document.querySelector("[data-refresh]");
  if (!box) return;
  async function refresh() {
    try {
      const r = await fetch(box.dataset.refresh, { credentials: "same-origin" });
      if (r.ok) box.innerHTML = await r.text();
    } catch (e) { /* server restarting: try again next tick */ }
  }
  setInterval(refresh, 1000);
  window.smartcabRefresh = refresh;
})();
