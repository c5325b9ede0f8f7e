// Refresh the parts of a page marked data-refresh="URL" every data-every-s seconds, without
// reloading the page. A session that has ended turns the answer into the login page: reload,
// so the browser shows it.
"use strict";
document.querySelectorAll("[data-refresh]").forEach((el) => {
  const every = 1000 * Number(el.dataset.everyS || 15);
  setInterval(async () => {
    try {
      const r = await fetch(el.dataset.refresh, {credentials: "same-origin", cache: "no-store"});
      if (r.redirected || !r.ok) { window.location.reload(); return; }
      el.innerHTML = await r.text();
    } catch (e) {
      // the node is restarting or unreachable: keep the last figures, try again next time
    }
  }, every);
});

// Refuse a file over the size limit before sending it (the server refuses it too).
document.querySelectorAll("input[type=file][data-max-bytes]").forEach((input) => {
  input.addEventListener("change", () => {
    const max = Number(input.dataset.maxBytes);
    const big = Array.from(input.files).some((f) => f.size > max);
    input.setCustomValidity(big ? `The file is larger than ${Math.round(max / 1048576)} MB.` : "");
    input.reportValidity();
  });
});
