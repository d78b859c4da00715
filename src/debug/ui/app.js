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

  // ---- traffic ----

  function pct(x) {
    if (x === null || x === undefined) return "";
    var r = Math.round(x * 10) / 10;
    return (r === Math.round(r) ? String(Math.round(r)) : r.toFixed(1)) + "%";
  }

  function duration(seconds) {
    if (seconds >= 3600 && seconds % 3600 === 0) return seconds / 3600 + " h";
    if (seconds >= 60 && seconds % 60 === 0) return seconds / 60 + " min";
    return seconds + " s";
  }

  function drainState(d, now) {
    if (d.expired) return badge("expired", "idle");
    if (d.drill && d.drill.aborted) return badge("drill aborted: not applied", "bad");
    if (d.start && new Date(d.start).getTime() > now) return badge("not started", "idle");
    return badge("in force", "warn");
  }

  // The overview's Traffic panel: a summary and a link to the traffic page.
  function renderTrafficSummary(t) {
    var rows = (t.shares && t.shares.rows) || [];
    var services = {};
    rows.forEach(function (r) { services[r.service] = true; });
    var drains = (t.drains || []).filter(function (d) { return !d.expired && !(d.drill && d.drill.aborted); });
    var drills = (t.drills || []).filter(function (d) { return d.active; });
    if (!rows.length && !(t.drains || []).length && !(t.drills || []).length) {
      return h("p", { class: "muted" }, "No traffic policy decides any service; no drain and no drill. ",
        h("a", { href: "/ui/traffic", text: "Traffic page (what-if) →" }));
    }
    return h("p", { class: "traffic-summary" },
      Object.keys(services).length + " service(s) decided by the traffic policy · " + drains.length +
      " drain(s) in force · " + drills.length + " drill(s) in progress. ",
      h("a", { href: "/ui/traffic", text: "Traffic page →" }));
  }

  // Per service and source region, each cluster's share: the decision translation turns into the
  // locality weights of the EDS meshfed serves.
  function renderShares(t, clouds) {
    var table = t.shares || { columns: [], rows: [] };
    var out = [];
    if (!table.rows.length) {
      out.push(h("p", { class: "muted", id: "shares-empty",
        text: "No traffic policy decides any service: proxies get their usual locality failover priorities." }));
    } else {
      out.push(h("table", { class: "grid shares" },
        h("thead", null, h("tr", null, h("th", { text: "service" }), h("th", { text: "source region" }),
          table.columns.map(function (c) {
            return h("th", { "data-cluster": c.cluster }, c.cluster,
              h("div", { class: "muted small", text: (clouds[c.cluster] || cloudOf(c.cluster, [])) + (c.network ? " · " + c.network : "") }));
          }))),
        h("tbody", null, table.rows.map(function (r) {
          var region = r.sourceRegion === null || r.sourceRegion === undefined ? "*" : r.sourceRegion;
          return h("tr", { class: "share-row", "data-service": r.service, "data-region": region },
            h("td", { text: r.service }),
            h("td", { text: region === "*" ? "any other region" : region }),
            table.columns.map(function (c) {
              var cell = r.shares[c.cluster];
              if (!cell) return h("td", { class: "share none", "data-cluster": c.cluster, text: "—", title: "not in this row: usual priorities" });
              var bar = h("div", { class: "bar" }, h("span", { style: "width:" + Math.max(0, Math.min(100, cell.share)) + "%" }));
              return h("td", { class: "share", "data-cluster": c.cluster, "data-share": String(cell.share), title: cell.reason },
                h("div", { class: "share-value" }, h("b", { text: pct(cell.share) }),
                  cell.split ? h("span", { class: "muted small", text: " of split " + cell.split + "%" }) : null),
                bar,
                h("div", { class: "why" }, (cell.why || []).map(function (w) {
                  var kind = w === "drain" || w === "takes-over" ? "warn" : w === "failover" || w === "no-healthy-endpoints" ? "bad" : "idle";
                  return [badge(w, kind), " "];
                })),
                h("div", { class: "reason small", text: cell.reason }));
            }));
        }))));
    }
    var notes = [];
    var decided = (t.decisions && t.decisions.services) || {};
    Object.keys(decided).forEach(function (host) {
      (decided[host].notes || []).forEach(function (n) { notes.push(host + ": " + n); });
    });
    var failover = (t.status && t.status.failover) || {};
    Object.keys(failover).forEach(function (host) {
      Object.keys(failover[host]).forEach(function (c) {
        var f = failover[host][c];
        notes.push(host + ": " + c + " failed over since " + timeOf(f.since) + (f.backSince ? ", healthy again since " + timeOf(f.backSince) : ""));
      });
    });
    (t.unknownClusters || []).forEach(function (c) {
      notes.push("the policy names cluster " + c + ", which the registry does not know");
    });
    if (notes.length) out.push(h("ul", { class: "notes" }, notes.map(function (n) { return h("li", { text: n }); })));
    if (t.status && t.status.nextChange) {
      out.push(h("p", { class: "muted small", text: "Next change by itself (a ramp step, an expiry, a failback): " + timeOf(t.status.nextChange) }));
    }
    return out;
  }

  function renderDrains(t) {
    var drains = t.drains || [];
    if (!drains.length) return h("p", { class: "muted", id: "drains-empty", text: "No drain." });
    var now = Date.now();
    return h("table", { class: "grid drains" },
      h("thead", null, h("tr", null, ["target", "state", "capacity now", "to", "ramp", "start", "expires", "reason", "drill"].map(function (c) {
        return h("th", { text: c });
      }))),
      h("tbody", null, drains.map(function (d) {
        var ramp = d.rampStep ? "−" + d.rampStep + "% every " + duration(d.rampEverySeconds) : "none (at once)";
        return h("tr", { class: "drain", "data-target": d.target },
          h("td", { text: d.target }),
          h("td", null, drainState(d, now)),
          h("td", { class: "capacity-now", text: d.expired ? "100% (expired)" : d.capacityNow + "%" }),
          h("td", { text: d.capacity + "%" }),
          h("td", { class: "ramp", text: ramp }),
          h("td", { text: d.start ? timeOf(d.start) : "when first seen" }),
          h("td", { class: "expires", text: d.expires ? new Date(d.expires).toLocaleString() : "" }),
          h("td", { text: d.reason || "" }),
          h("td", { text: d.drill ? "aborts below " + d.drill.abortBelowHealthy + "% healthy" : "" }));
      })));
  }

  function renderDrills(t) {
    var drills = t.drills || [];
    if (!drills.length) return h("p", { class: "muted", id: "drills-empty", text: "No drill." });
    return drills.map(function (d) {
      var state = d.aborted ? badge("ABORTED", "bad") : d.ended ? badge(d.ended.how, "ok") : badge("IN PROGRESS", "warn");
      return h("div", { class: "drill card", "data-drill": d.key, "data-active": d.active ? "1" : "0" },
        h("h3", null, "Drill: " + d.target + " ", state),
        h("p", { class: "muted small", text: (d.reason ? d.reason + " · " : "") + "started " + timeOf(d.start) + " · expires " +
          timeOf(d.expires) + " · aborts when a cluster taking its traffic falls below " + d.abortBelowHealthy + "% healthy" }),
        d.aborted ? h("p", { class: "abort", text: "aborted " + timeOf(d.aborted.at) + ": " + d.aborted.reason }) : null,
        d.ended ? h("p", { class: "muted", text: "ended " + timeOf(d.ended.at) + ": " + d.ended.how }) : null,
        h("table", { class: "grid steps" },
          h("thead", null, h("tr", null, ["capacity", "decided", "push", "published", "all proxies ACKed"].map(function (c) {
            return h("th", { text: c });
          }))),
          h("tbody", null, (d.stepAcks || []).map(function (st) {
            var acks = st.acks;
            var acked = !acks ? "not published yet"
              : acks.allAckedAt ? timeOf(acks.allAckedAt) + " (" + acks.ackSeconds.toFixed(2) + "s, " + acks.proxies + " proxies)"
                : "not yet: " + acks.pending.length + " of " + acks.proxies + " pending";
            return h("tr", { class: "step", "data-capacity": st.capacity, "data-acked": acks && acks.allAckedAt ? "1" : "0" },
              h("td", { text: st.capacity + "%" }),
              h("td", { text: timeOf(st.decidedAt) }),
              h("td", { text: st.generation ? String(st.generation) : "" }),
              h("td", { text: st.publishedAt ? timeOf(st.publishedAt) : "" }),
              h("td", { class: "acked", text: acked }));
          }))));
    });
  }

  // The what-if form: each cluster's and locality's share of a proxy's requests to a host, now and under
  // a hypothesis (/debug/whatif). Its inputs survive the polls: only the suggestion lists are refreshed.
  function whatIfForm(initial) {
    function field(label, input) { return h("label", { class: "field" }, h("span", { class: "muted small", text: label }), input); }
    var proxy = h("input", { id: "whatif-proxy", name: "proxyID", required: true, placeholder: "POD.NS", autocomplete: "off", value: initial.proxy || "" });
    proxy.setAttribute("list", "whatif-proxies");
    var host = h("input", { id: "whatif-host", name: "host", required: true, placeholder: "FQDN", autocomplete: "off", value: initial.host || "" });
    host.setAttribute("list", "whatif-hosts");
    var drain = h("select", { id: "whatif-drain", name: "drain" }, h("option", { value: "", text: "(none)" }));
    var down = h("select", { id: "whatif-down", name: "down" }, h("option", { value: "", text: "(none)" }));
    var form = h("form", { id: "whatif-form", class: "whatif-form" },
      field("proxy (connected)", proxy), field("host", host), field("drain cluster to 0", drain), field("cluster lost", down),
      h("button", { type: "submit", text: "What if?" }),
      h("datalist", { id: "whatif-proxies" }), h("datalist", { id: "whatif-hosts" }));
    var result = h("div", { id: "whatif-result" });
    var pendingDrain = initial.drain || "", pendingDown = initial.down || "";
    form.onsubmit = function (ev) {
      ev.preventDefault();
      var q = "proxyID=" + encodeURIComponent(proxy.value.trim()) + "&host=" + encodeURIComponent(host.value.trim());
      if (drain.value) q += "&drain=" + encodeURIComponent(drain.value);
      if (down.value) q += "&down=" + encodeURIComponent(down.value);
      history.replaceState(null, "", "/ui/traffic?" + q.replace("proxyID=", "proxy="));
      replace(result, h("p", { class: "muted", text: "asking /debug/whatif…" }));
      result.removeAttribute("data-state");
      fetch("/debug/whatif?" + q, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
        if (r.ok) return r.json();
        return r.text().then(function (text) { throw new Error("HTTP " + r.status + ": " + text.trim()); });
      }).then(function (w) {
        replace(result, renderWhatIf(w));
        result.setAttribute("data-state", "ok");
      }, function (e) {
        replace(result, h("p", { id: "whatif-error", class: "error-text", role: "alert", text: "/debug/whatif: " + e.message }));
        result.setAttribute("data-state", "error");
      });
    };
    // suggestions from the polled state; the selects keep their value (or the one the URL asked for)
    function update(proxies, hosts, clusters) {
      replace(document.getElementById("whatif-proxies"), proxies.map(function (p) { return h("option", { value: p }); }));
      replace(document.getElementById("whatif-hosts"), hosts.map(function (x) { return h("option", { value: x }); }));
      [[drain, "pendingDrain"], [down, "pendingDown"]].forEach(function (pair) {
        var sel = pair[0];
        var want = sel.value || (pair[1] === "pendingDrain" ? pendingDrain : pendingDown);
        var have = [].slice.call(sel.options, 1).map(function (o) { return o.value; });
        if (have.join("\n") !== clusters.join("\n")) {
          replace(sel, [h("option", { value: "", text: "(none)" })].concat(clusters.map(function (c) { return h("option", { value: c, text: c }); })));
        }
        if (want && clusters.indexOf(want) >= 0) sel.value = want;
      });
      pendingDrain = pendingDown = "";
    }
    return { form: form, result: result, update: update, submit: function () { form.requestSubmit(); } };
  }

  function renderWhatIf(w) {
    var now = w.now || { byCluster: {}, localities: [] };
    var then = w.whatIf;
    var clusters = Object.keys(now.byCluster);
    if (then) Object.keys(then.byCluster).forEach(function (c) { if (clusters.indexOf(c) < 0) clusters.push(c); });
    clusters.sort();
    // the decision's reason; and when the proxy gets none of a share the decision gives (an assignment
    // without endpoints of that cluster it can reach: another network without mesh mTLS), that too
    function decisionReason(p, c) {
      var d = p && p.decision && p.decision[c];
      if (!d) return "";
      var got = p.byCluster[c] || 0;
      return d.share > 0 && got === 0
        ? d.reason + " (decided " + pct(d.share) + "; this proxy's assignment has no endpoint of " + c + " it can use)"
        : d.reason;
    }
    var head = ["cluster", "now"].concat(then ? ["what if", "change"] : []).concat(["why (now)"]).concat(then ? ["why (what if)"] : []);
    var byCluster = h("table", { class: "grid whatif-clusters" },
      h("thead", null, h("tr", null, head.map(function (c) { return h("th", { text: c }); }))),
      h("tbody", null, clusters.map(function (c) {
        var a = now.byCluster[c] || 0, b = then ? (then.byCluster[c] || 0) : null;
        var delta = then ? Math.round((b - a) * 10) / 10 : null;
        return h("tr", { class: "whatif-cluster", "data-cluster": c, "data-now": String(a), "data-whatif": then ? String(b) : null },
          h("td", { text: c }),
          h("td", { class: "now", text: pct(a) }),
          then ? h("td", { class: "whatif", text: pct(b) }) : null,
          then ? h("td", { class: delta < 0 ? "bad-text" : delta > 0 ? "ok-text" : "muted", text: (delta > 0 ? "+" : "") + delta + " points" }) : null,
          h("td", { class: "reason small", text: decisionReason(now, c) }),
          then ? h("td", { class: "reason small", text: decisionReason(then, c) }) : null);
      })));
    // localities: now and under the hypothesis, side by side by name
    var byName = {};
    var order = [];
    function add(list, which) {
      (list || []).forEach(function (l) {
        if (!byName[l.locality]) { byName[l.locality] = {}; order.push(l.locality); }
        var e = byName[l.locality][which] = byName[l.locality][which] || { share: 0, priorities: [], byCluster: {} };
        e.share += l.share;
        if (e.priorities.indexOf(l.priority) < 0) e.priorities.push(l.priority);
        Object.keys(l.byCluster).forEach(function (c) { e.byCluster[c] = (e.byCluster[c] || 0) + l.byCluster[c]; });
      });
    }
    add(now.localities, "now");
    if (then) add(then.localities, "then");
    function cellOf(e) {
      if (!e) return h("td", { class: "muted", text: "not served" });
      var parts = Object.keys(e.byCluster).sort().map(function (c) { return c + " " + pct(e.byCluster[c]); });
      return h("td", null, h("b", { text: pct(e.share) }), h("span", { class: "muted small", text: " P" + e.priorities.join("/P") }),
        parts.length ? h("div", { class: "small muted", text: parts.join(", ") }) : null);
    }
    var localities = h("table", { class: "grid whatif-localities" },
      h("thead", null, h("tr", null, ["locality", "now"].concat(then ? ["what if"] : []).map(function (c) { return h("th", { text: c }); }))),
      h("tbody", null, order.map(function (name) {
        var e = byName[name];
        return h("tr", { class: "whatif-locality", "data-locality": name, "data-now": e.now ? String(e.now.share) : "0",
          "data-whatif": then ? (e.then ? String(e.then.share) : "0") : null },
          h("td", { text: name }), cellOf(e.now), then ? cellOf(e.then) : null);
      })));
    return [
      h("p", { class: "summary", id: "whatif-summary", text: w.host + " (" + w.cluster + ") from a proxy in region " +
        (w.sourceRegion || "(none)") + ", network " + (w.network || "(none)") +
        (w.localityWeighted ? "; locality weights count" : "; locality weights do not count (no split or drain for it)") +
        (w.hypothesis ? ". What if: " + w.hypothesis + "." : ". No hypothesis: the shares now.") }),
      h("h3", { text: "Share per cluster" }), byCluster,
      h("h3", { text: "Share per locality" }), localities,
      (w.notes || []).length ? h("ul", { class: "notes" }, w.notes.map(function (n) { return h("li", { text: n }); })) : null
    ];
  }

  function trafficPage() {
    var app = document.getElementById("app");
    document.title = "meshfed · traffic";
    var initial = {
      proxy: params.get("proxy") || "", host: params.get("host") || "",
      drain: params.get("drain") || "", down: params.get("down") || ""
    };
    var whatIf = whatIfForm(initial);
    replace(app, [
      section("shares", "Shares", "per service and source region, each cluster's share: the decision the EDS serves (/debug/trafficz)"),
      section("drains", "Drains", "in the mesh config or the TrafficPolicy"),
      section("drills", "Drills", "steps, when every proxy ACKed each, the abort or the end (/debug/drillz)"),
      h("section", { id: "whatif" }, h("h2", null, "What if", h("span", { class: "muted small",
        text: " a proxy's requests to a host per cluster and locality, now and with a cluster drained or lost (/debug/whatif)" })),
        whatIf.form, whatIf.result)
    ]);
    function body(id) { return document.querySelector("#" + id + " .body"); }
    var polls = 0, hosts = [], autoSubmit = !!(initial.proxy && initial.host);
    function poll() {
      var wantHosts = polls % 20 === 0;
      polls++;
      Promise.all([
        getJSON("/debug/trafficz"),
        getJSON("/debug/syncz"),
        getJSON("/debug/clusterz"),
        wantHosts ? getJSON("/debug/registryz") : Promise.resolve(null)
      ]).then(function (r) {
        var t = r[0];
        var clouds = {};
        r[2].forEach(function (c) { clouds[c.id] = cloudOf(c.id, c.regions); });
        replace(body("shares"), renderShares(t, clouds));
        replace(body("drains"), renderDrains(t));
        replace(body("drills"), renderDrills(t));
        if (r[3]) hosts = (r[3].services || []).map(function (s) { return s.hostname; }).sort();
        whatIf.update(r[1].map(function (p) { return p.proxy; }).sort(), hosts, r[2].map(function (c) { return c.id; }).sort());
        if (autoSubmit) { autoSubmit = false; whatIf.submit(); }
        setLive(true, "live · " + new Date().toLocaleTimeString());
        document.body.setAttribute("data-loaded", "1");
      }, function (e) {
        setLive(false, "cannot reach meshfed (" + e.message + ")");
      }).then(function () { setTimeout(poll, POLL_MS); });
    }
    poll();
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
      section("traffic", "Traffic", "shares, drains and drills: the traffic page")
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
        replace(body("traffic"), renderTrafficSummary(r[5]));
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
          h("a", { href: "/debug/explain?proxyID=" + encodeURIComponent(ex.proxy) + "&pretty", text: "explain (JSON)" }), " · ",
          h("a", { id: "whatif-link", href: "/ui/traffic?proxy=" + encodeURIComponent(ex.proxy), text: "what if…" }))));
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
  else if (location.pathname === "/ui/traffic") trafficPage();
  else overview();
})();
