// The demo's simulator panel: drives the same /sim endpoints the tests use.
(function () {
  const $ = (id) => document.getElementById(id);
  const msg = (t) => { $("sim-msg").textContent = t; };
  async function post(path, body) {
    const r = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), credentials: "same-origin",
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }
  function chip(tag, action) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = tag.serial ? `${tag.serial} · ${tag.product}` : tag.epc;
    b.title = tag.epc;
    b.dataset.epc = tag.epc;
    b.onclick = async () => {
      try { await post("/sim/tags", { [action]: [tag.epc] }); await load(); }
      catch (e) { msg(e.message); }
    };
    return b;
  }
  async function load() {
    const s = await (await fetch("/sim/state", { credentials: "same-origin" })).json();
    const sel = $("sim-badge");
    if (!sel.options.length) {
      for (const b of s.badges) {
        const o = document.createElement("option");
        o.value = b.uid;
        o.textContent = `${b.name} (${b.uid})${b.enabled ? "" : " — disabled"}`;
        sel.appendChild(o);
      }
      const o = document.createElement("option");
      o.value = "DEADBEEF"; o.textContent = "Unknown badge (DEADBEEF)";
      sel.appendChild(o);
    }
    $("sim-inside").replaceChildren(...s.inside.map((t) => chip(t, "remove")));
    $("sim-outside").replaceChildren(...s.outside.map((t) => chip(t, "add")));
    $("sim-hw").textContent = `door ${s.door}, lock ${s.lock}${s.idle ? "" : ", busy"}`;
  }
  $("sim-tap").onclick = async () => {
    try { await post("/sim/badge", { uid: $("sim-badge").value }); msg("Badge presented."); }
    catch (e) { msg(e.message); }
  };
  $("sim-open").onclick = async () => {
    try { await post("/sim/door", { state: "open" }); msg("Door opened."); } catch (e) { msg(e.message); }
  };
  $("sim-close").onclick = async () => {
    try { await post("/sim/door", { state: "closed" }); msg("Door closed."); } catch (e) { msg(e.message); }
  };
  load();
  setInterval(load, 1500);
})();
