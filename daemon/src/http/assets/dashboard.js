// patchbay dashboard: re-fetches the live part of the page every few seconds. The
// page is whole without this script; it only keeps it current.
(function () {
  const main = document.getElementById("live");
  if (!main) return;
  const every = (parseInt(main.dataset.refresh, 10) || 5) * 1000;
  async function refresh() {
    // Not while the tab is hidden or the operator is using a form in it.
    if (document.hidden || main.contains(document.activeElement)) return;
    const url = new URL(window.location.href);
    url.searchParams.set("part", "main");
    url.searchParams.delete("retried");
    url.searchParams.delete("retry_failed");
    try {
      const reply = await fetch(url, { credentials: "same-origin" });
      if (reply.ok) main.innerHTML = await reply.text();
    } catch (_) {
      // The daemon is restarting: try again at the next tick.
    }
  }
  setInterval(refresh, every);
})();
