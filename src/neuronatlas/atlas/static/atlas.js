/* The neuron atlas: a page per view (index, site, layer, neuron, clustering, cluster, search) behind hash routes.
   Data chunks are scripts calling atlas.add(key, data) (a page opened from disk may not fetch files), loaded
   on demand by <script> tags; chunk layout: src/neuronatlas/atlas/build.py. Plain JavaScript, no dependencies. */
(function () {
  "use strict";

  // ------------------------------------------------------------------ data chunks
  const waiting = new Map();
  const loaded = new Map();
  window.atlas = {
    add(key, data) {
      const w = waiting.get(key);
      if (w) {
        waiting.delete(key);
        w.resolve(data);
      } else {
        loaded.set(key, unpack(data));
      }
    },
  };

  function load(key) {
    if (!loaded.has(key)) {
      loaded.set(key, new Promise((resolve, reject) => {
        waiting.set(key, { resolve: (data) => unpack(data).then(resolve, reject), reject });
        const s = document.createElement("script");
        s.src = "data/" + key + ".js";
        s.onerror = () => {
          waiting.delete(key);
          loaded.delete(key);
          reject(new Error("data file data/" + key + ".js is missing; re-run the workflow to rebuild the atlas"));
        };
        s.onload = () => {
          s.remove();
          if (waiting.has(key)) {
            waiting.delete(key);
            reject(new Error("data/" + key + ".js holds no data for " + key));
          }
        };
        document.head.appendChild(s);
      }));
    }
    return loaded.get(key);
  }

  // typed arrays arrive as base64 of their little-endian bytes ({t, b}) or of the bytes' zlib deflate ({t, z})
  const TYPES = { u1: Uint8Array, i1: Int8Array, u2: Uint16Array, i2: Int16Array, u4: Uint32Array, i4: Int32Array, f4: Float32Array, f8: Float64Array };
  const NONE = { Uint16Array: 0xffff, Uint32Array: 0xffffffff };

  function bytesOf(text) {
    const bin = atob(text);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  }

  async function typedArray(o) {
    if (o.b !== undefined) return new TYPES[o.t](bytesOf(o.b).buffer);
    if (typeof DecompressionStream === "undefined") throw new Error("this browser cannot inflate the atlas's data (no DecompressionStream); use a current Chrome, Firefox or Safari");
    const stream = new Blob([bytesOf(o.z)]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new TYPES[o.t](await new Response(stream).arrayBuffer());
  }

  // replaces every {t, b} / {t, z} object of a chunk by its typed array, in place
  async function unpack(node) {
    if (node === null || typeof node !== "object") return node;
    if (typeof node.t === "string" && (typeof node.b === "string" || typeof node.z === "string")) return typedArray(node);
    if (Array.isArray(node) && (node.length === 0 || node[0] === null || typeof node[0] !== "object")) return node;
    const keys = Array.isArray(node) ? node.keys() : Object.keys(node);
    for (const k of keys) node[k] = await unpack(node[k]);
    return node;
  }

  // ------------------------------------------------------------------ formatting
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ESC[c]);
  }
  function fmt(x) {
    if (x === null || x === undefined || (typeof x === "number" && !Number.isFinite(x))) return "–";
    if (typeof x !== "number") return esc(x);
    const a = Math.abs(x);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return x.toExponential(2);
    return String(Number(x.toPrecision(4)));
  }
  function mib(bytes) {
    return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1) + " MiB";
  }
  function shown(text) {
    return text.replace(/\r?\n/g, "↵").replace(/\t/g, "→") || "∅";
  }
  function nid(layer, index) {
    return "L" + layer + "-N" + index;
  }
  function siteHref(key) {
    return "#/s/" + key;
  }
  function neuronHref(key, layer, index) {
    return siteHref(key) + "/" + nid(layer, index);
  }
  function clusterHref(key, name, c) {
    return siteHref(key) + "/c/" + name + (c === undefined ? "" : "/" + c);
  }
  function table(head, rows, numeric) {
    const num = new Set(numeric || []);
    const th = head.map((h, i) => `<th${num.has(i) ? ' class="num"' : ""}>${h}</th>`).join("");
    const body = rows.map((r) => "<tr>" + r.map((c, i) => `<td${num.has(i) ? ' class="num"' : ""}>${c}</td>`).join("") + "</tr>").join("");
    return `<table><thead><tr>${th}</tr></thead><tbody>${body}</tbody></table>`;
  }
  function verdict(v) {
    return `<span class="verdict-${esc(String(v || "").replace(/ /g, "-"))}">${esc(v || "")}</span>`;
  }
  function searchKey(text) {
    return text.trim().replace(/^(?:##|\u0120|\u2581)+/, "").trim().toLowerCase();
  }

  // ------------------------------------------------------------------ routes
  function route() {
    const raw = location.hash.replace(/^#\/?/, "");
    const [path, query] = raw.split("?");
    const parts = path ? path.split("/").map(decodeURIComponent) : [];
    const opts = new URLSearchParams(query || "");
    if (!parts.length) return { view: "index" };
    if (parts[0] === "search") return { view: "search", q: parts.slice(1).join("/") };
    if (parts[0] === "s" && parts.length >= 4) {
      const site = parts.slice(1, 4).join("/");
      const rest = parts.slice(4);
      if (!rest.length) return { view: "site", site };
      if (rest[0] === "search") return { view: "search", site, q: rest.slice(1).join("/") };
      if (rest[0] === "c" && rest.length >= 3) {
        const r = { view: "clustering", site, clustering: rest[1] + "/" + rest[2] };
        if (rest.length >= 4) return { ...r, view: "cluster", cluster: Number(rest[3]) };
        return r;
      }
      let m = /^L(\d+)-N(\d+)$/.exec(rest[0]);
      if (m) return { view: "neuron", site, layer: Number(m[1]), index: Number(m[2]) };
      m = /^L(\d+)$/.exec(rest[0]);
      if (m) return { view: "layer", site, layer: Number(m[1]), sort: opts.get("sort") || "index", by: opts.get("by"), all: opts.has("all") };
    }
    return { view: "missing", path };
  }

  function siteOf(index, key) {
    const s = index.sites.find((x) => x.key === key);
    if (!s) throw new Error("no site " + key + " in this atlas");
    return s;
  }

  function crumbs(r) {
    const out = ['<a href="#/">index</a>'];
    if (r.site) out.push(`<a href="${siteHref(r.site)}">${esc(r.site)}</a>`);
    if (r.layer !== undefined) out.push(`<a href="${siteHref(r.site)}/L${r.layer}">layer ${r.layer}</a>`);
    if (r.view === "neuron") out.push(esc(nid(r.layer, r.index)));
    if (r.clustering) out.push(`<a href="${clusterHref(r.site, r.clustering)}">${esc(r.clustering)}</a>`);
    if (r.view === "cluster") out.push("cluster " + r.cluster);
    if (r.view === "search") out.push("search");
    return out.join(" / ");
  }

  // ------------------------------------------------------------------ index
  function viewIndex(index) {
    const sites = index.sites;
    let h = `<h1>Neuron atlas</h1><p class="muted">${sites.length} (model, dataset, site) views, ${mib(index.bytes)} of data in all.
      Search a neuron (<code>L4-N1555</code>) or a token (neurons whose eq. 1 representation ranks it highest) in the box above.</p>`;
    h += "<h2>Sites</h2>";
    h += table(
      ["site", "layers × width", "neurons with examples", "clusterings", "N2G graphs", "textualization", "pruning", "MoE", "token search", "size"],
      sites.map((s) => [
        `<a href="${siteHref(s.key)}">${esc(s.key)}</a>`,
        `${s.layers.length}${s.layers.length !== s.n_layers ? " of " + s.n_layers : ""} × ${s.width}`,
        s.neurons_with_examples,
        s.clusterings.length ? s.clusterings.length + (s.clusterings.some((c) => c.ablated) ? " (ablated)" : "") : "–",
        s.n2g || "–",
        s.textualization || "–",
        Object.keys(s.pruning).join(", ") || "–",
        s.moe ? s.moe + " experts" : "–",
        s.search ? s.search.tokens + " tokens" : "–",
        mib(s.bytes),
      ]),
      [1, 2, 9]
    );
    h += "<h2>Models</h2>" + table(["model", "source", "description"], Object.entries(index.models).map(([m, v]) => [esc(m), esc(v.source), esc(v.description)]));
    h += "<h2>Datasets</h2>" + table(["dataset", "source", "description"], Object.entries(index.datasets).map(([d, v]) => [esc(d), esc(v.source), esc(v.description)]));
    h += "<h2>Replication verdicts</h2>";
    if (!index.claims.length) {
      h += '<p class="muted">No replication report in this grid (replication.enabled is off).</p>';
    } else {
      h += table(
        ["paper", "claim", "model", "dataset", "scope", "estimate [CI]", "n", "verdict"],
        index.claims.map((c) => [
          esc(c.paper || ""),
          `<span title="${esc(c.claim || "")}">${esc(c.claim_id || "")}</span>`,
          esc(c.model || ""),
          esc(c.dataset || ""),
          esc(c.scope || ""),
          `${fmt(c.estimate)} [${fmt(c.ci_low)}, ${fmt(c.ci_high)}]`,
          fmt(c.n),
          verdict(c.verdict) + (c.note ? ` <span class="note" title="${esc(c.note)}">ⓘ</span>` : ""),
        ]),
        [6]
      );
    }
    return h;
  }

  // ------------------------------------------------------------------ site
  async function viewSite(index, r) {
    const s = siteOf(index, r.site);
    const site = await load(s.key + "/site");
    let h = `<h1>${esc(s.key)}</h1><p class="muted">${site.n_layers} layers × ${site.width} neurons; ${site.neurons_with_examples} neurons with
      their top ${site.examples} of ${site.top_k} examples (±${site.context} tokens); ${site.n_tokens} tokens of statistics.</p>`;
    h += "<h2>Layers</h2>";
    h += table(
      ["layer", "neurons with examples", "largest max", "mean max", "N2G graphs", "textualized"],
      site.layer_rows.map((x) => [`<a href="${siteHref(s.key)}/L${x.layer}">layer ${x.layer}</a>`, x.with_examples, fmt(x.max), fmt(x.mean_max), x.n2g || "–", x.textualization || "–"]),
      [1, 2, 3, 4, 5]
    );
    if (site.clusterings.length) {
      h += "<h2>Clusterings</h2>";
      h += table(
        ["clustering", "clusters", "ablated"],
        site.clusterings.map((c) => [`<a href="${clusterHref(s.key, c.name)}">${esc(c.name)}</a>`, c.n_clusters, c.ablated ? "yes" : "–"]),
        [1]
      );
    }
    const prune = Object.entries(site.pruning);
    if (prune.length) h += "<h2>Selective pruning</h2>" + table(["experiment", "tasks"], prune.map(([e, t]) => [esc(e), esc(t.join(", "))]));
    if (site.moe) h += `<p>MoEfication: ${site.moe} experts per layer.</p>`;
    h += site.search
      ? `<p class="note">Token search: ${site.search.tokens} tokens (seen ≥ ${site.search.min_count} times), each neuron's top ${site.search.top}.</p>`
      : '<p class="note">No token search here: the store has no per-token statistics, or no token was seen atlas.min_count times.</p>';
    return h;
  }

  // ------------------------------------------------------------------ layer
  async function viewLayer(index, r) {
    const s = siteOf(index, r.site);
    const site = await load(s.key + "/site");
    if (!site.layers.includes(r.layer)) return `<p class="error">Layer ${r.layer} is not in the atlas of ${esc(s.key)} (layers ${site.layers.join(", ")}).</p>`;
    const L = await load(s.key + "/L" + r.layer);
    const by = r.by || (site.clusterings[0] && site.clusterings[0].name);
    const clu = by ? await load(s.key + "/" + clusteringFile(by)) : null;
    const ids = clu ? clu.ids : null;
    const strings = L.top ? await load(s.key + "/strings") : null;
    const width = L.max.length;
    const hasEx = L.ex === null ? null : new Set(L.ex);
    const rows = [];
    for (let n = 0; n < width; n++) rows.push(n);
    const key = { max: (n) => L.max[n], mean: (n) => L.mean[n], var: (n) => L.var[n], cluster: (n) => (ids ? ids[r.layer * site.width + n] : 0) };
    if (key[r.sort]) {
      const f = key[r.sort];
      const desc = r.sort !== "cluster";
      rows.sort((a, b) => {
        const x = Number.isNaN(f(a)) ? -Infinity : f(a);
        const y = Number.isNaN(f(b)) ? -Infinity : f(b);
        return (desc ? y - x : x - y) || a - b;
      });
    }
    const base = `${siteHref(s.key)}/L${r.layer}`;
    const q = (sort) => `${base}?sort=${sort}${by ? "&by=" + encodeURIComponent(by) : ""}`;
    const head = [
      ["index", "neuron"],
      ["max", "max"],
      ["mean", "mean"],
      ["var", "variance"],
    ].map(([k, label]) => `<a href="${q(k)}"${r.sort === k ? ' class="sorted"' : ""}>${label}${r.sort === k ? " ▾" : ""}</a>`);
    if (clu) head.push(`<a href="${q("cluster")}"${r.sort === "cluster" ? ' class="sorted"' : ""}>cluster${r.sort === "cluster" ? " ▴" : ""}</a>`);
    if (L.top) head.push("top token (eq. 1)");
    const shownRows = r.all ? rows : rows.slice(0, 500);
    const top = L.top ? L.top.tok : null;
    const body = shownRows.map((n) => {
      const row = [
        `<a href="${neuronHref(s.key, r.layer, n)}">${nid(r.layer, n)}</a>${hasEx && !hasEx.has(n) ? ' <span class="note" title="no stored examples (not in the atlas sample)">·</span>' : ""}`,
        fmt(L.max[n]),
        fmt(L.mean[n]),
        fmt(L.var[n]),
      ];
      if (clu) {
        const c = ids[r.layer * site.width + n];
        row.push(c >= 0 ? `<a href="${clusterHref(s.key, by, c)}">${c}</a>` : "–");
      }
      if (top) row.push(`<span class="chip">${esc(shown(strings[top[n * L.top.r]]))}</span>`);
      return row;
    });
    let h = `<h1>${esc(s.key)} · layer ${r.layer}</h1>`;
    if (site.clusterings.length) {
      const opts = site.clusterings.map((c) => `<option value="${esc(base + "?sort=" + r.sort + "&by=" + encodeURIComponent(c.name))}"${c.name === by ? " selected" : ""}>${esc(c.name)}</option>`);
      h += `<p>Cluster column: <select data-nav="1" aria-label="clustering">${opts.join("")}</select></p>`;
    }
    h += table(head, body, [1, 2, 3]);
    if (!r.all && rows.length > shownRows.length) h += `<p><a href="${q(r.sort)}&all=1">show all ${rows.length} neurons</a></p>`;
    return h;
  }

  function clusteringFile(name) {
    return "c-" + name.replace("/", "-");
  }

  // ------------------------------------------------------------------ neuron
  async function viewNeuron(index, r) {
    const s = siteOf(index, r.site);
    const site = await load(s.key + "/site");
    const { layer, index: n } = r;
    if (!site.layers.includes(layer) || n < 0 || n >= site.width) {
      return `<p class="error">${nid(layer, n)} is not in the atlas of ${esc(s.key)} (layers ${site.layers.join(", ")}, neurons 0–${site.width - 1}).</p>`;
    }
    const [L, strings, clusterings] = await Promise.all([
      load(s.key + "/L" + layer),
      load(s.key + "/strings"),
      Promise.all(site.clusterings.map((c) => load(s.key + "/" + clusteringFile(c.name)))),
    ]);
    const pos = L.ex === null ? n : L.ex.indexOf(n);
    const block = pos >= 0 ? await load(`${s.key}/L${layer}-b${Math.floor(pos / site.block)}`) : null;
    const graph = L.n2g.includes(n) ? (await load(`${s.key}/n2g-L${layer}`))[String(n)] : null;
    const flat = layer * site.width + n;

    let h = `<h1>${esc(s.key)} · <span id="neuron-id">${nid(layer, n)}</span></h1><p class="navline">`;
    if (n > 0) h += `<a href="${neuronHref(s.key, layer, n - 1)}">← ${nid(layer, n - 1)}</a>`;
    if (n + 1 < site.width) h += `<a href="${neuronHref(s.key, layer, n + 1)}">${nid(layer, n + 1)} →</a>`;
    h += `<a href="${siteHref(s.key)}/L${layer}?sort=max">layer ${layer} by max</a></p>`;

    // statistics
    const larger = L.max.reduce((acc, v) => acc + (v > L.max[n] ? 1 : 0), 0);
    h += '<h2>Statistics</h2><table class="stats" id="stats"><tbody>';
    h += `<tr><th>max</th><td class="num">${fmt(L.max[n])}</td><td class="note">rank ${larger + 1} of ${site.width} in layer ${layer}</td></tr>`;
    h += `<tr><th>mean</th><td class="num">${fmt(L.mean[n])}</td><td></td></tr>`;
    h += `<tr><th>variance</th><td class="num">${fmt(L.var[n])}</td><td class="note">std ${fmt(Math.sqrt(L.var[n]))}</td></tr>`;
    h += "</tbody></table>";

    // eq. 1 top tokens
    if (L.top) {
      const tok = L.top.tok;
      const chips = [];
      for (let j = 0; j < L.top.r; j++) {
        chips.push(`<span class="chip">${esc(shown(strings[tok[n * L.top.r + j]]))}<small>${fmt(L.top.val[n * L.top.r + j])}</small></span>`);
      }
      h += `<h2>Top tokens (eq. 1 mean activation)</h2><div class="chips" id="top-tokens">${chips.join("")}</div>`;
    }

    // examples
    h += `<h2>Top examples</h2>`;
    if (!block) {
      h += '<p class="muted">No stored examples for this neuron (it is not in the atlas sample of this site; see atlas.max_neurons).</p>';
    } else {
      h += exampleRows(site, block, pos - block.first, strings);
    }

    // clusters
    if (clusterings.length) {
      h += "<h2>Clusters</h2>";
      const rows = clusterings.map((c) => {
        const id = c.ids[flat];
        if (id < 0) return [esc(c.name), "–", "–", '<span class="muted">not in this clustering (dropped by refinement)</span>', "–"];
        const toks = (c.tokens[String(id)] || []).map(([t, sc]) => `<span class="chip">${esc(shown(t))}<small>${fmt(sc)}</small></span>`).join("");
        return [esc(c.name), `<a href="${clusterHref(s.key, c.name, id)}">${id}</a>`, c.sizes[id], `<span class="chips">${toks}</span>`, effect(c, id)];
      });
      h += table(["clustering", "cluster", "size", "explanation tokens", "ablation: loss change % (baselines)"], rows, [2]);
    }

    // N2G
    if (graph) {
      h += "<h2>N2G graph</h2>";
      const sets = Object.entries(graph.scores);
      h += table(
        ["evaluation set", "firing precision", "firing recall", "firing F1", "non-firing F1", "pearson", "test examples"],
        sets.map(([k, v]) => [esc(k), fmt(v.firing_precision), fmt(v.firing_recall), fmt(v.firing_f1), fmt(v.nonfiring_f1), fmt(v.pearson), fmt(v.test_examples)]),
        [1, 2, 3, 4, 5, 6]
      );
      if (graph.svg) h += `<div class="graph"><img alt="N2G graph of ${nid(layer, n)}" src="data:image/svg+xml;base64,${graph.svg}"></div>`;
    }

    // textualization
    const tx = L.tx[String(n)];
    if (tx) {
      h += "<h2>Feature textualization</h2>";
      h += table(
        ["optimised input activation", "most activating word", "its activation", "closest words to the optimised input"],
        [[fmt(tx.act_optimized), `<span class="chip">${esc(tx.word)}</span>`, fmt(tx.act_word), tx.closest.map(([w, c]) => `<span class="chip">${esc(w)}<small>${fmt(c)}</small></span>`).join("")]],
        [0, 2]
      );
      h += `<p class="note">Initial activation ${fmt(tx.act_initial)}; rank of the most activating word among the optimised input's neighbours: ${fmt(tx.rank_of_most_activating)}.</p>`;
    }

    // selective pruning and MoE
    const prune = Object.entries(L.prune);
    if (prune.length) {
      h += "<h2>Selective-pruning scores</h2>";
      const total = site.n_layers * site.width;
      const rows = [];
      for (const [exp, tasks] of prune) {
        for (const [task, v] of Object.entries(tasks)) {
          const rank = v.rank[n];
          rows.push([esc(exp), esc(task), fmt(v.score[n]), `${rank} of ${total}`, fmt((100 * rank) / total) + " %"]);
        }
      }
      h += table(["experiment", "task", "score", "rank", "top"], rows, [2, 3, 4]);
    }
    if (L.moe) h += `<h2>MoEfication</h2><p>Expert <b>${L.moe[n]}</b> of ${site.moe} in layer ${layer}.</p>`;
    return h;
  }

  function effect(c, id) {
    if (!c.effects) return '<span class="muted">not ablated</span>';
    const e = c.effects.clusters[String(id)];
    if (!e) return '<span class="muted">not among the evaluated clusters</span>';
    if (e.status !== "ok") return esc(e.status);
    const base = c.effects.baselines.map((b) => `${esc(b)} ${fmt(e.baselines[b][0])}`).join(", ");
    return `<b>${fmt(e.change)}</b> <span class="note">(${base})</span>`;
  }

  function exampleRows(site, block, row, strings) {
    const E = site.examples;
    const S = 2 * site.context + 1;
    const tok = block.tok;
    const val = block.val;
    const none = NONE[tok.constructor.name];
    const scale = block.scale[row];
    let h = `<p class="legend note">Each token shaded by this neuron's activation on it (orange positive, blue negative; full colour = ${fmt(scale)},
      the largest |activation| over these contexts); the outlined token is the example's maximum.</p><div id="examples">`;
    for (let e = 0; e < E; e++) {
      const slot = row * E + e;
      if (block.doc[slot] < 0) continue;
      const spans = [];
      for (let j = 0; j < S; j++) {
        const t = tok[slot * S + j];
        if (t === none) continue;
        const q = val[slot * S + j];
        const a = (q / 127) * scale;
        const alpha = (Math.abs(q) / 127).toFixed(3);
        const color = q >= 0 ? `rgba(255, 122, 0, ${alpha})` : `rgba(40, 110, 255, ${alpha})`;
        const cls = j === site.context ? "tok key" : "tok";
        spans.push(`<span class="${cls}" data-q="${q}" data-a="${a}" style="background-color: ${color}" title="${fmt(a)}">${esc(shown(strings[t]))}</span>`);
      }
      h += `<div class="example" data-example="${e}"><div class="meta"><b>${fmt(block.act[slot])}</b><br>doc ${block.doc[slot]}, token ${block.pos[slot]}</div>
        <div class="ctx">${spans.join("")}</div></div>`;
    }
    return h + "</div>";
  }

  // ------------------------------------------------------------------ clusterings
  async function viewClustering(index, r) {
    const s = siteOf(index, r.site);
    const c = await load(s.key + "/" + clusteringFile(r.clustering));
    let h = `<h1>${esc(s.key)} · ${esc(c.name)}</h1><p class="muted">${c.sizes.filter((x) => x > 0).length} clusters${c.refined ? " after refinement" : ""}.</p>`;
    const rows = [];
    c.sizes.forEach((size, id) => {
      if (!size) return;
      const toks = (c.tokens[String(id)] || []).slice(0, 6).map(([t]) => `<span class="chip">${esc(shown(t))}</span>`).join("");
      rows.push([`<a href="${clusterHref(s.key, c.name, id)}">${id}</a>`, size, `<span class="chips">${toks}</span>`, effect(c, id)]);
    });
    return h + table(["cluster", "size", "explanation tokens", "ablation: loss change % (baselines)"], rows, [1]);
  }

  async function viewCluster(index, r) {
    const s = siteOf(index, r.site);
    const [site, c] = await Promise.all([load(s.key + "/site"), load(s.key + "/" + clusteringFile(r.clustering))]);
    const ids = c.ids;
    const byLayer = new Map();
    for (let f = 0; f < ids.length; f++) {
      if (ids[f] !== r.cluster) continue;
      const layer = Math.floor(f / site.width);
      if (!byLayer.has(layer)) byLayer.set(layer, []);
      byLayer.get(layer).push(f % site.width);
    }
    let h = `<h1>${esc(s.key)} · ${esc(c.name)} · cluster ${r.cluster}</h1><p class="muted">${c.sizes[r.cluster] || 0} neurons in ${byLayer.size} layers.</p>`;
    const toks = c.tokens[String(r.cluster)] || [];
    h += "<h2>Explanation tokens</h2>" + table(["rank", "token", "score"], toks.map(([t, sc], i) => [i + 1, `<span class="chip">${esc(shown(t))}</span>`, fmt(sc)]), [0, 2]);
    h += "<h2>Ablation</h2>";
    const e = c.effects && c.effects.clusters[String(r.cluster)];
    if (!e) {
      h += `<p class="muted">${c.effects ? "This cluster was not among the evaluated ones." : "This clustering was not ablated."}</p>`;
    } else {
      h += table(
        ["condition", "loss change %", "CI"],
        [["cluster ablated", `<b>${fmt(e.change)}</b>`, ""]].concat(c.effects.baselines.map((b) => [esc(b), fmt(e.baselines[b][0]), `[${fmt(e.baselines[b][1])}, ${fmt(e.baselines[b][2])}]`])),
        [1]
      );
      h += `<p class="note">Status ${esc(e.status)}; intact loss ${fmt(e.base_loss)}, ablated ${fmt(e.loss)} over ${fmt(e.sentences)} sentences.</p>`;
    }
    h += '<h2>Members</h2><div class="members">';
    for (const [layer, list] of [...byLayer.entries()].sort((a, b) => a[0] - b[0])) {
      const inAtlas = site.layers.includes(layer);
      h += `<p><b>layer ${layer}</b> (${list.length}): ` + list.map((n) => (inAtlas ? `<a href="${neuronHref(s.key, layer, n)}">${nid(layer, n)}</a>` : nid(layer, n))).join(" ") + "</p>";
    }
    return h + "</div>";
  }

  // ------------------------------------------------------------------ search
  const searchMaps = new Map();

  async function viewSearch(index, r) {
    const scope = r.site ? [siteOf(index, r.site)] : index.sites;
    const q = r.q.trim();
    document.getElementById("q").value = q;
    let h = `<h1>Search: ${esc(q)}</h1><p class="muted">in ${r.site ? esc(r.site) : "every site"}</p>`;
    const m = /^L?(\d+)\s*[-_:/ ]\s*N?(\d+)$/i.exec(q);
    if (m) {
      const layer = Number(m[1]);
      const n = Number(m[2]);
      const hits = scope.filter((s) => s.layers.includes(layer) && n < s.width);
      h += hits.length
        ? table(["site", "neuron"], hits.map((s) => [esc(s.key), `<a class="hit" href="${neuronHref(s.key, layer, n)}">${nid(layer, n)}</a>`]))
        : `<p>No site of the atlas has neuron ${nid(layer, n)}.</p>`;
      return h;
    }
    const key = searchKey(q);
    const rows = [];
    const near = new Set();
    for (const s of scope) {
      if (!s.search) continue;
      const data = await load(s.key + "/search");
      if (!searchMaps.has(s.key)) searchMaps.set(s.key, new Map(data.keys.map((k, i) => [k, i])));
      const i = searchMaps.get(s.key).get(key);
      if (i === undefined) {
        for (const k of data.keys) if (k.startsWith(key) && k !== key && near.size < 30) near.add(k);
        continue;
      }
      const neurons = data.neuron;
      const ranks = data.rank;
      for (let j = data.ptr[i]; j < data.ptr[i + 1] && rows.length < 1000; j++) {
        const layer = Math.floor(neurons[j] / s.width);
        const n = neurons[j] % s.width;
        rows.push({ rank: ranks[j], cells: [esc(s.key), `<a class="hit" href="${neuronHref(s.key, layer, n)}">${nid(layer, n)}</a>`, ranks[j]] });
      }
    }
    if (rows.length) {
      h += `<p>Neurons whose eq. 1 representation ranks <span class="chip">${esc(key)}</span> among their top tokens (rank 1 = their highest):</p>`;
      rows.sort((a, b) => a.rank - b.rank);
      h += table(["site", "neuron", "rank"], rows.map((x) => x.cells), [2]);
    } else {
      h += `<p>No neuron ranks the token <span class="chip">${esc(key)}</span> among its top tokens${scope.some((s) => s.search) ? "" : " (no site has token search)"}.</p>`;
    }
    if (near.size) {
      h += "<p>Tokens starting with it: " + [...near].map((k) => `<a href="${r.site ? siteHref(r.site) + "/search/" : "#/search/"}${encodeURIComponent(k)}">${esc(k)}</a>`).join(", ") + "</p>";
    }
    return h;
  }

  // ------------------------------------------------------------------ rendering
  let renders = 0;
  async function render() {
    const r = route();
    const main = document.getElementById("main");
    const mine = ++renders;
    const t0 = performance.now();
    main.dataset.state = "loading";
    main.dataset.view = r.view;
    document.getElementById("crumbs").innerHTML = crumbs(r);
    let html;
    try {
      const index = await load("index");
      const views = { index: viewIndex, site: viewSite, layer: viewLayer, neuron: viewNeuron, clustering: viewClustering, cluster: viewCluster, search: viewSearch };
      html = views[r.view] ? await views[r.view](index, r) : `<p class="error">No page at this address (${esc(r.path)}).</p>`;
    } catch (err) {
      html = `<p class="error">${esc(err.message)}</p>`;
    }
    if (mine !== renders) return;
    main.innerHTML = html;
    main.dataset.ms = String(Math.round(performance.now() - t0));
    main.dataset.state = html.startsWith('<p class="error">') ? "error" : "ready";
    document.title = "Neuron atlas · " + (r.site ? r.site + (r.view === "neuron" ? " · " + nid(r.layer, r.index) : "") : r.view);
    window.scrollTo(0, 0);
  }

  document.getElementById("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = document.getElementById("q").value.trim();
    if (!q) return;
    const r = route();
    location.hash = (r.site ? "#/s/" + r.site + "/search/" : "#/search/") + encodeURIComponent(q);
  });
  document.addEventListener("change", (ev) => {
    if (ev.target.matches("select[data-nav]")) location.hash = ev.target.value;
  });
  window.addEventListener("hashchange", render);
  render();
})();
