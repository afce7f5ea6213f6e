// wsigen view: one OpenSeadragon viewer over the layers the server lists, a µm scale bar and the
// slide's facts. Everything from the server is inserted as text (textContent), never as HTML.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const $ = (id) => document.getElementById(id);
  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "osd/images/",   // the vendored button images: the page works offline
    drawer: "canvas",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
  });
  const shown = new Map();      // layer name -> {item, gen, input}
  let chosen = null;            // a layer the user picked; otherwise the newest is shown
  let order = [];               // layer names as the server lists them, oldest first
  let worldUm = null;           // µm across world width 1
  let zoomedFromUrl = false;

  function text(id, s) { $(id).textContent = s; }

  function facts(info) {
    text("name", info.name || "");
    const parts = [`${info.width} × ${info.height} px`];
    if (info.mpp) parts.push(`${Number(info.mpp).toPrecision(3)} µm/px`);
    if (info.model) parts.push(`model ${info.model}`);
    if (info.seed !== null && info.seed !== undefined) parts.push(`seed ${info.seed}`);
    if (info.class) parts.push(`class ${info.class}` + (info.guidance !== null && info.guidance !== undefined ? ` (w = ${info.guidance})` : ""));
    text("facts", parts.join(" · "));
    $("synthetic").hidden = info.synthetic !== true;
    let line = "";
    if (info.kind === "store" && !info.complete) {
      const n = info.stages.length, done = info.stages_complete.length;
      line = info.writer ? `being written by ${info.writer}: ${done} of ${n} stages complete`
                         : `interrupted: ${done} of ${n} stages complete (resume it to continue)`;
      if (info.state) line += `; stage ${info.state.stage} saved after step ${info.state.step}`;
      if (info.steps) line += ` of ${info.steps}`;
    }
    text("progress", line);
  }

  function pick() {
    if (chosen && shown.has(chosen)) return chosen;
    let newest = null;
    for (const name of order) if (shown.get(name)?.item) newest = name;
    return newest;
  }

  function show(name) {
    for (const [n, s] of shown) {
      if (s.item) s.item.setOpacity(n === name ? 1 : 0);  // opacity 0: OpenSeadragon loads no tiles
      s.input.checked = n === name;
    }
  }

  function zoomFromUrl() {
    // ?zoom=Z&x=X&y=Y: X, Y are fractions of the image's width and height (default: the centre)
    if (zoomedFromUrl || !params.has("zoom")) return;
    zoomedFromUrl = true;
    const item = viewer.world.getItemAt(viewer.world.getItemCount() - 1);
    const b = item.getBounds();
    const x = parseFloat(params.get("x") ?? "0.5"), y = parseFloat(params.get("y") ?? "0.5");
    const vp = viewer.viewport;
    vp.zoomTo(parseFloat(params.get("zoom")) || 1, null, true);
    vp.panTo(new OpenSeadragon.Point(b.x + x * b.width, b.y + y * b.height), true);
  }

  function add(layer, info) {
    const entry = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio";
    input.name = "layer";
    input.addEventListener("change", () => { chosen = layer.name; show(layer.name); });
    entry.append(input, document.createTextNode(" " + layer.title));
    $("layers").append(entry);
    const record = { item: null, gen: layer.url, input, entry };
    shown.set(layer.name, record);
    viewer.addTiledImage({
      tileSource: {
        width: layer.width, height: layer.height, tileSize: info.tile_size, tileOverlap: info.overlap,
        minLevel: 0, maxLevel: layer.max_level,
        getTileUrl: (level, x, y) => `${layer.url}/${level}/${x}_${y}.${info.tile_format}`,
      },
      x: 0, y: 0, width: layer.world_width,
      opacity: 0,
      success: (e) => {
        record.item = e.item;
        show(pick());
        zoomFromUrl();
      },
    });
  }

  function sync(info) {
    facts(info);
    worldUm = info.world_um;
    order = info.layers.map((l) => l.name);
    const names = new Set(order);
    for (const [name, s] of shown) {          // gone, or recreated by a new run
      const now = info.layers.find((l) => l.name === name);
      if (!names.has(name) || now.url !== s.gen) {
        if (s.item) viewer.world.removeItem(s.item);
        s.entry.remove();
        shown.delete(name);
      }
    }
    if (shown.size) show(pick());
    for (const layer of info.layers) if (!shown.has(layer.name)) add(layer, info);
    if (shown.size <= 1) $("layers").replaceChildren();  // one layer needs no chooser
  }

  async function poll() {
    try {
      const r = await fetch("info.json", { cache: "no-store" });
      const info = await r.json();
      sync(info);
      if (info.live) setTimeout(poll, 2000);
    } catch (e) {
      text("progress", "server not reachable");
      setTimeout(poll, 5000);
    }
  }

  // Scale bar: the longest 1/2/5 × 10^k µm that fits in 150 screen pixels.
  function scalebar() {
    if (!worldUm || viewer.world.getItemCount() === 0) return;
    const pxPerWorld = viewer.viewport.deltaPixelsFromPointsNoRotate(new OpenSeadragon.Point(1, 0), true).x;
    const umPerPx = worldUm / pxPerWorld;
    const target = 150 * umPerPx;
    const p = Math.pow(10, Math.floor(Math.log10(target)));
    const len = [5, 2, 1].map((m) => m * p).find((v) => v <= target) || p;
    $("scalebar-bar").style.width = `${len / umPerPx}px`;
    const nice = (v) => Number(v.toPrecision(1));
    text("scalebar-label", len >= 1000 ? `${nice(len / 1000)} mm` : `${nice(len)} µm`);
    $("scalebar").hidden = false;
  }
  viewer.addHandler("update-viewport", scalebar);
  viewer.addHandler("open", scalebar);

  poll();
})();
