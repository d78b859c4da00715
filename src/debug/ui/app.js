// meshfed's debug UI: plain JavaScript, no dependencies. It polls the JSON endpoints of the debug
// server and re-renders; every value is written as text (never as HTML).
(function () {
  "use strict";

  var POLL_MS = 1500;
  var TYPES = ["CDS", "EDS", "LDS", "RDS"];
  var TYPE_URLS = {
    CDS: "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    EDS: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    LDS: "type.googleapis.com/envoy.config.listener.v3.Listener",
    RDS: "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
  };

  // ---- DOM helpers ----

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else if (k.indexOf("data-") === 0 || k === "href" || k === "title" || k === "id" || k === "colspan") {
          el.setAttribute(k, String(v));
        } else el[k] = v;
      });
    }
    for (var i = 2; i < arguments.length; i++) append(el, arguments[i]);
    return el;
  }

  function append(el, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) child.forEach(function (c) { append(el, c); });
    else if (typeof child === "string" || typeof child === "number") el.appendChild(document.createTextNode(String(child)));
    else el.appendChild(child);
  }

  function replace(el, content) {
    while (el.firstChild) el.removeChild(el.firstChild);
    append(el, content);
  }

  function badge(text, kind) {
    return h("span", { class: "badge " + (kind || ""), text: text });
  }

  function stateClass(state) {
    switch (state) {
      case "SYNCED": case "synced": case "HEALTHY": return "ok";
      case "STALE": case "syncing": case "DRAINING": return "warn";
      case "ERROR": case "timeout": case "closed": case "UNHEALTHY": return "bad";
      default: return "idle";
    }
  }

  function loc(l) {
    if (!l) return "";
    var s = (l.region || "?") + "/" + (l.zone || "?");
    if (l.subzone) s += "/" + l.subzone;
    return s;
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 1) return "just now";
    if (seconds < 90) return Math.round(seconds) + " s ago";
    if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  function timeOf(iso) {
    if (!iso) return "";
    var d = new Date(iso);
    return isNaN(d.getTime()) ? iso : d.toLocaleTimeString();
  }

  // A guess of the cloud from the cluster id or its regions (for grouping only).
  function cloudOf(id, regions) {
    var s = (id || "").toLowerCase();
    if (/^(aws|eks)/.test(s)) return "AWS";
    if (/^(azure|aks)/.test(s)) return "Azure";
    if (/^(gcp|gke|google)/.test(s)) return "Google Cloud";
    var r = (regions || []).join(" ");
    if (/\b[a-z]{2}-[a-z]+-\d\b/.test(r)) return "AWS";
    if (/\b(westeurope|northeurope|eastus2?|westus\d?|uksouth|francecentral)\b/.test(r)) return "Azure";
    return "Other";
  }

  // ---- data ----

  // With a debug token (--debug-token-file), the JSON endpoints answer 401 until the browser presents it:
  // the page asks for it once and keeps it in a cookie for this site, so that links (a config dump,
  // /metrics) carry it too.
  var TOKEN_COOKIE = "meshfed-debug-token";
  var asking = false;

  function askForToken() {
    if (asking) return;
    asking = true;
    var input = h("input", { id: "token-input", type: "password", autocomplete: "off", placeholder: "debug token" });
    var form = h("form", { id: "token-form", class: "token-form" },
      h("p", null, "This meshfed requires its debug token (the Secret meshfed-debug-token, key token)."),
      input, h("button", { type: "submit", text: "Open" }));
    form.onsubmit = function (ev) {
      ev.preventDefault();
      document.cookie = TOKEN_COOKIE + "=" + input.value.trim() + "; path=/; SameSite=Strict" +
        (location.protocol === "https:" ? "; Secure" : "");
      location.reload();
    };
    replace(document.getElementById("app"), form);
    input.focus();
  }

  function getJSON(url) {
    return fetch(url, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
      if (r.status === 401) askForToken();
      if (!r.ok) {
        return r.text().then(function (t) {
          var e = new Error(url + ": " + r.status + " " + t.trim());
          e.status = r.status;
          throw e;
        });
      }
      return r.json();
    });
  }

  var live = { ok: 0, failed: 0 };

  function setLive(ok, text) {
    var el = document.getElementById("live");
    el.className = "live " + (ok ? "ok" : "bad");
    document.getElementById("live-text").textContent = text;
  }

  // ---- overview ----

  function renderClusters(clusters) {
    var byCloud = {};
    clusters.forEach(function (c) {
      var cloud = cloudOf(c.id, c.regions);
      (byCloud[cloud] = byCloud[cloud] || []).push(c);
    });
    var clouds = Object.keys(byCloud).sort();
    if (!clouds.length) return h("p", { class: "muted", text: "No clusters." });
    return h("div", { class: "clouds" }, clouds.map(function (cloud) {
      return h("div", { class: "cloud" },
        h("h3", { text: cloud }),
        h("div", { class: "cards" }, byCloud[cloud].map(function (c) {
          var healthy = c.syncStatus === "synced" && !c.unreachableSince && !c.restoredFrom && !(c.errors || []).length && !c.lastError;
          var errs = (c.errors || []).slice();
          if (c.lastError && errs.indexOf(c.lastError) < 0) errs.unshift(c.lastError);
          return h("div", { class: "card cluster-card " + (healthy ? "healthy" : "unhealthy"), "data-cluster": c.id },
            h("div", { class: "card-head" },
              h("span", { class: "card-title", text: c.id }),
              badge(c.syncStatus, stateClass(c.syncStatus))),
            h("dl", null,
              h("dt", { text: "network" }), h("dd", { text: c.network || "(none)" }),
              h("dt", { text: "regions" }), h("dd", { text: (c.regions || []).join(", ") || "(none)" }),
              h("dt", { text: "endpoints" }), h("dd", { text: c.healthyEndpoints + " healthy of " + c.endpoints }),
              h("dt", { text: "last event" }), h("dd", { text: ago(c.lastEventAgeSeconds) }),
              h("dt", { text: "reachable" }), h("dd", { class: c.unreachableSince ? "bad-text" : "",
                text: c.unreachableSince ? "unreachable since " + timeOf(c.unreachableSince) : "yes" }),
              // served from the last-known state restored at start, until the cluster answers
              c.restoredFrom ? h("dt", { text: "restored" }) : null,
              c.restoredFrom ? h("dd", { class: "bad-text", "data-restored": c.restoredFrom.observedAt,
                text: "last-known state observed " + ago(c.restoredFrom.ageSeconds) }) : null,
              h("dt", { text: "source" }), h("dd", { class: "small", text: c.source || "" })),
            errs.length ? h("ul", { class: "errors" }, errs.map(function (e) { return h("li", { text: e }); })) : null);
        })));
    }));
  }

  function renderServices(services) {
    if (!services.length) return h("p", { class: "muted", text: "No services." });
    return h("div", { class: "services" }, services.map(function (s) {
      // cluster -> region -> zone -> endpoints
      var tree = {};
      s.endpoints.forEach(function (e) {
        var c = tree[e.cluster] = tree[e.cluster] || {};
        var r = c[e.locality.region || "(no region)"] = c[e.locality.region || "(no region)"] || {};
        var z = r[e.locality.zone || "(no zone)"] = r[e.locality.zone || "(no zone)"] || [];
        z.push(e);
      });
      var healthy = s.endpoints.filter(function (e) { return e.health === "HEALTHY"; }).length;
      var ports = (s.ports || []).map(function (p) { return p.name + " " + p.port + "/" + p.protocol; }).join(", ");
      return h("div", { class: "card service", "data-service": s.service },
        h("div", { class: "card-head" },
          h("span", { class: "card-title", text: s.service }),
          h("span", { class: "muted small", text: s.hostname + " · " + ports }),
          badge(healthy + "/" + s.endpoints.length + " healthy", healthy === s.endpoints.length ? "ok" : "warn")),
        h("div", { class: "tree" }, Object.keys(tree).sort().map(function (cluster) {
          return h("div", { class: "tree-cluster" },
            h("div", { class: "tree-label" }, h("b", { text: cluster }),
              h("span", { class: "muted small", text: " " + cloudOf(cluster, Object.keys(tree[cluster])) })),
            Object.keys(tree[cluster]).sort().map(function (region) {
              return Object.keys(tree[cluster][region]).sort().map(function (zone) {
                var eps = tree[cluster][region][zone];
                return h("div", { class: "tree-zone" },
                  h("span", { class: "zone-name", text: region + " / " + zone }),
                  eps.map(function (e) {
                    return h("span", { class: "ep " + stateClass(e.health), title: e.health + " · network " + e.network +
                      (e.workload ? " · pod " + e.workload.name : ""), text: e.address });
                  }));
              });
            }));
        })));
    }));
  }

  function lastNack(p) {
    var msgs = [];
    TYPES.forEach(function (t) {
      var r = p.resources && p.resources[TYPE_URLS[t]];
      if (r && r.lastError) msgs.push(t + ": " + r.lastError);
    });
    return msgs.join("; ");
  }

  function renderProxies(proxies) {
    if (!proxies.length) return h("p", { class: "muted", text: "No proxy is connected." });
    return h("table", { class: "grid proxies" },
      h("thead", null, h("tr", null, ["proxy", "type", "xDS", "cluster", "locality"].concat(TYPES).concat(["last NACK"])
        .map(function (c) { return h("th", { text: c }); }))),
      h("tbody", null, proxies.map(function (p) {
        return h("tr", { "data-proxy": p.proxy },
          h("td", null, h("a", { href: "/ui/proxy?id=" + encodeURIComponent(p.proxy), text: p.proxy })),
          h("td", { text: p.proxy_type }),
          h("td", { text: p.flavor }),
          h("td", { text: p.cluster_id || "" }),
          h("td", { text: loc(p.locality) }),
          TYPES.map(function (t) {
            var st = p.status[t];
            return h("td", null, badge(st, stateClass(st)));
          }),
          h("td", { class: "nack", text: lastNack(p) }));
      })));
  }

  function renderPushes(ps) {
    var pushes = (ps.pushes || []).slice(0, 15);
    if (!pushes.length) return h("p", { class: "muted", text: "No pushes yet." });
    return h("table", { class: "grid pushes" },
      h("thead", null, h("tr", null, ["generation", "time", "took", "trigger", "changed"].map(function (c) {
        return h("th", { text: c });
      }))),
      h("tbody", null, pushes.map(function (p) {
        var types = Object.keys(p.types).map(function (t) { return t + " " + p.types[t]; }).join(", ");
        return h("tr", null,
          h("td", { text: p.generation }),
          h("td", { text: timeOf(p.time) }),
          h("td", { text: p.durationMs.toFixed(1) + " ms" }),
          h("td", { class: "trigger", text: p.trigger || "(initial state)" }),
          h("td", { text: types || "nothing" }));
      })));
  }

  function renderWarnings(warnings) {
    if (!warnings.length) return h("p", { class: "muted", text: "No warnings: every configured behaviour takes effect." });
    return h("ul", { class: "warnings" }, warnings.map(function (w) {
      return h("li", { "data-kind": w.kind }, badge(w.kind, "warn"), " ", h("b", { text: w.subject }), " ",
        h("span", { text: w.message }));
    }));
  }

  function renderTraffic(t) {
    var drains = t.drains || [];
    var drills = t.drills || [];
    if (!drains.length && !drills.length) return h("p", { class: "muted", text: "No drain and no drill." });
    var out = [];
    if (drains.length) {
      out.push(h("table", { class: "grid drains" },
        h("thead", null, h("tr", null, ["target", "capacity now", "to", "ramp", "expires", "reason", "drill"].map(function (c) {
          return h("th", { text: c });
        }))),
        h("tbody", null, drains.map(function (d) {
          return h("tr", null,
            h("td", { text: d.target }),
            h("td", null, d.expired ? badge("expired", "warn") : d.capacityNow + "%"),
            h("td", { text: d.capacity + "%" }),
            h("td", { text: d.ramp || "" }),
            h("td", { text: timeOf(d.expires) }),
            h("td", { text: d.reason || "" }),
            h("td", { text: d.drill ? "aborts below " + d.drill.abortBelowHealthy + "% healthy" : "" }));
        }))));
    }
    drills.forEach(function (d) {
      var state = d.aborted ? badge("ABORTED", "bad") : d.ended ? badge(d.ended.how, "ok") : badge("ACTIVE", "warn");
      out.push(h("div", { class: "drill", "data-drill": d.key },
        h("h3", null, "Drill: " + d.target + " ", state),
        d.aborted ? h("p", { class: "abort", text: "aborted " + timeOf(d.aborted.at) + ": " + d.aborted.reason }) : null,
        h("table", { class: "grid steps" },
          h("thead", null, h("tr", null, ["capacity", "decided", "push", "published", "all proxies ACKed"].map(function (c) {
            return h("th", { text: c });
          }))),
          h("tbody", null, (d.stepAcks || []).map(function (st) {
            var acks = st.acks;
            var acked = !acks ? "not published yet"
              : acks.allAckedAt ? timeOf(acks.allAckedAt) + " (" + acks.ackSeconds.toFixed(2) + "s, " + acks.proxies + " proxies)"
                : "not yet: " + acks.pending.length + " of " + acks.proxies + " pending";
            return h("tr", null,
              h("td", { text: st.capacity + "%" }),
              h("td", { text: timeOf(st.decidedAt) }),
              h("td", { text: st.generation ? String(st.generation) : "" }),
              h("td", { text: st.publishedAt ? timeOf(st.publishedAt) : "" }),
              h("td", { text: acked }));
          })))));
    });
    return out;
  }

  function section(id, title, sub) {
    return h("section", { id: id }, h("h2", null, title, sub ? h("span", { class: "muted small", text: " " + sub }) : null),
      h("div", { class: "body" }));
  }

  function overview() {
    var app = document.getElementById("app");
    replace(app, [
      section("clusters", "Kubernetes clusters", "by cloud"),
      section("warnings", "Warnings", "what meshfed had to work around"),
      section("services", "Federated services", "endpoints by cluster, region and zone"),
      section("proxies", "Connected proxies", "sync status per xDS type (istioctl proxy-status)"),
      section("pushes", "Recent pushes", "newest first"),
      section("traffic", "Traffic", "drains and drills (/debug/trafficz, /debug/drillz)")
    ]);
    function body(id) { return document.querySelector("#" + id + " .body"); }
    function poll() {
      Promise.all([
        getJSON("/debug/clusterz"),
        getJSON("/debug/endpointz"),
        getJSON("/debug/syncz"),
        getJSON("/debug/push_status"),
        getJSON("/debug/warnings"),
        getJSON("/debug/trafficz")
      ]).then(function (r) {
        replace(body("traffic"), renderTraffic(r[5]));
        replace(body("clusters"), renderClusters(r[0]));
        replace(body("services"), renderServices(r[1]));
        replace(body("proxies"), renderProxies(r[2]));
        replace(body("pushes"), renderPushes(r[3]));
        replace(body("warnings"), renderWarnings(r[4]));
        // a meshfed serving its built-in demo says so on top of every page (a mis-mounted mesh config)
        var demo = r[4].filter(function (w) { return w.kind === "built-in-demo"; })[0];
        var banner = document.getElementById("demo-banner");
        banner.hidden = !demo;
        banner.textContent = demo ? demo.message : "";
        setLive(true, "live · generation " + r[3].generation + " · " + new Date().toLocaleTimeString());
        document.body.setAttribute("data-loaded", "1");
      }, function (e) {
        setLive(false, "cannot reach meshfed (" + e.message + ")");
      }).then(function () { setTimeout(poll, POLL_MS); });
    }
    poll();
  }

  // ---- proxy page ----

  function renderExplain(ex, sync) {
    var info = h("div", { class: "card proxy-info" },
      h("div", { class: "card-head" }, h("span", { class: "card-title", text: ex.proxy }),
        badge(ex.proxyType, "idle")),
      h("dl", null,
        h("dt", { text: "node id" }), h("dd", { class: "small", text: ex.nodeId }),
        h("dt", { text: "cluster" }), h("dd", { text: ex.clusterId || "(unknown)" }),
        h("dt", { text: "network" }), h("dd", { text: ex.network || "(none)" }),
        h("dt", { text: "locality" }), h("dd", { id: "proxy-locality", text: loc(ex.locality) || "(none)" }),
        h("dt", { text: "xDS" }), h("dd", null, sync ? [sync.flavor + " ", TYPES.map(function (t) {
          return [badge(t + " " + sync.status[t], stateClass(sync.status[t])), " "];
        })] : "(not connected)"),
        sync && lastNack(sync) ? [h("dt", { text: "last NACK" }), h("dd", { class: "nack", text: lastNack(sync) })] : null,
        h("dt", { text: "config dump" }), h("dd", null,
          h("a", { id: "config-dump-link", href: "/debug/config_dump?proxyID=" + encodeURIComponent(ex.proxy) + "&include_eds=true&pretty",
            text: "config_dump (with EDS)" }), " · ",
          h("a", { href: "/debug/config_dump?proxyID=" + encodeURIComponent(ex.proxy) + "&pretty", text: "without EDS" }), " · ",
          h("a", { href: "/debug/explain?proxyID=" + encodeURIComponent(ex.proxy) + "&pretty", text: "explain (JSON)" }))));
    var explained = ex.clusters.length ? ex.clusters.map(function (c) {
      return h("div", { class: "card explain", "data-envoy-cluster": c.name },
        h("div", { class: "card-head" }, h("span", { class: "card-title", text: c.service || c.name }),
          h("span", { class: "muted small", text: c.name })),
        h("table", { class: "grid" },
          h("thead", null, h("tr", null, ["priority", "locality", "cluster", "weight", "endpoints", "why"].map(function (t) {
            return h("th", { text: t });
          }))),
          h("tbody", null, c.localities.map(function (l) {
            return h("tr", { class: "locality-row", "data-locality": loc(l.locality), "data-priority": l.priority, "data-rule": l.rule },
              h("td", null, h("span", { class: "prio prio-" + Math.min(l.priority, 4), text: l.priority })),
              h("td", { text: loc(l.locality) }),
              h("td", { text: l.clusters.map(function (id) { return id + " (" + cloudOf(id, [l.locality.region]) + ")"; }).join(", ") }),
              h("td", { text: l.weight === null || l.weight === undefined ? "" : l.weight }),
              h("td", null, l.endpoints.map(function (e) {
                return h("span", { class: "ep " + stateClass(e.health), title: e.health + (e.viaGateway ? " · " + e.viaGateway : ""),
                  text: e.address + ":" + e.port + (e.viaGateway ? " (gw)" : "") });
              })),
              h("td", { class: "reason", text: l.reason }));
          }))));
    }) : h("p", { class: "muted", text: "The proxy is served no endpoints (it has not subscribed to EDS)." });
    return [info, h("p", { class: "summary", id: "explain-summary", text: ex.summary }), explained];
  }

  function proxyPage(id) {
    var app = document.getElementById("app");
    document.title = "meshfed · " + id;
    replace(app, [
      h("p", null, h("a", { href: "/", text: "← overview" })),
      h("section", { id: "proxy" }, h("h2", null, "Proxy ", h("span", { text: id })),
        h("p", { class: "muted small", text: "The priority each locality has for this proxy, read from the EDS meshfed serves it, and why." }),
        h("div", { class: "body" }))
    ]);
    var body = document.querySelector("#proxy .body");
    function poll() {
      Promise.all([
        getJSON("/debug/explain?proxyID=" + encodeURIComponent(id)),
        getJSON("/debug/syncz")
      ]).then(function (r) {
        var sync = r[1].filter(function (p) { return p.proxy === id; })[0];
        replace(body, renderExplain(r[0], sync));
        setLive(true, "live · " + new Date().toLocaleTimeString());
        document.body.setAttribute("data-loaded", "1");
      }, function (e) {
        if (e.status === 404) {
          replace(body, h("p", { class: "muted", text: "Proxy " + id + " is not connected to this meshfed." }));
          setLive(true, "live · " + new Date().toLocaleTimeString());
        } else {
          setLive(false, "cannot reach meshfed (" + e.message + ")");
        }
      }).then(function () { setTimeout(poll, POLL_MS); });
    }
    poll();
  }

  // ---- routing ----

  var params = new URLSearchParams(location.search);
  if (location.pathname === "/ui/proxy" && params.get("id")) proxyPage(params.get("id"));
  else overview();
})();
