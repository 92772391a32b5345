// Keel console: the playground's streamed turns (fetch + a reader over JSON lines). No inline script anywhere:
// the page's CSP allows only files served from /console/static.
"use strict";
(function () {
  const form = document.getElementById("playground");
  if (!form) return;
  const transcript = document.getElementById("transcript");
  let history = [];

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function citations(list, into) {
    if (!list.length) return;
    const ol = el("ol", "citations");
    ol.setAttribute("aria-label", "Citations");
    for (const c of list) {
      const li = el("li");
      li.id = "cite-" + c.n;
      const details = el("details");
      const summary = el("summary", null, "[" + c.n + "] " + (c.title || c.source) + (c.section ? " — " + c.section : "") +
        " (" + c.collection + ")");
      details.appendChild(summary);
      details.appendChild(el("blockquote", "passage", c.text));
      li.appendChild(details);
      ol.appendChild(li);
    }
    into.appendChild(ol);
  }

  function meta(into, parts) {
    into.appendChild(el("p", "muted turn-meta", parts.filter(Boolean).join(" · ")));
  }

  document.getElementById("new-chat").addEventListener("click", function () {
    history = [];
    transcript.replaceChildren();
  });

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    const data = new FormData(form);
    const message = String(data.get("message") || "").trim();
    if (!message) return;
    const picked = data.getAll("collection");
    data.delete("collection");
    data.set("collections", picked.join(","));
    data.set("history", JSON.stringify(history));
    const you = el("li", "turn user");
    you.appendChild(el("p", null, message));
    transcript.appendChild(you);
    const reply = el("li", "turn assistant");
    const text = el("p", "reply", "");
    reply.appendChild(text);
    transcript.appendChild(reply);
    form.querySelector("button[type=submit]").disabled = true;
    transcript.dataset.state = "busy";
    let answer = "";
    try {
      const response = await fetch(form.dataset.stream, {method: "POST", body: data, credentials: "same-origin"});
      if (!response.ok || !response.body) {
        const doc = new DOMParser().parseFromString(await response.text(), "text/html");
        const why = doc.querySelector(".error");
        text.className = "error";
        text.textContent = why ? why.textContent : "The request failed (" + response.status + ")";
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (!line) continue;
          const ev = JSON.parse(line);
          if (ev.type === "delta") { answer += ev.content; text.textContent = answer; }
          else if (ev.type === "citations") citations(ev.citations || [], reply);
          else if (ev.type === "done") {
            const u = ev.usage || {};
            meta(reply, [ev.deployment && "deployment " + ev.deployment,
                         u.prompt_tokens !== undefined && (u.prompt_tokens + " tokens in, " + u.completion_tokens + " out"),
                         ev.cost !== undefined && ("$" + Number(ev.cost).toFixed(6)), ev.cache_hit && "cache hit",
                         ev.cited && ev.cited.length && ("cited " + ev.cited.map(function (n) { return "[" + n + "]"; }).join(" "))]);
          } else if (ev.type === "error") {
            const p = el("p", "error", ev.detail + (ev.fix ? " — " + ev.fix : ""));
            p.setAttribute("role", "alert");
            reply.appendChild(p);
          } else if (ev.type === "turn") {
            const guards = (ev.guard_actions || []).map(function (g) { return g.guard + ": " + g.type + " → " + g.action; });
            meta(reply, ["request " + ev.request_id, guards.length ? "guards: " + guards.join(", ") : "no guard action"]);
          }
        }
      }
      history.push({role: "user", content: message}, {role: "assistant", content: answer});
      form.querySelector("#message").value = "";
    } catch (err) {
      const p = el("p", "error", "The reply was cut short: " + err);
      p.setAttribute("role", "alert");
      reply.appendChild(p);
      console.error(err);
    } finally {
      form.querySelector("button[type=submit]").disabled = false;
      transcript.dataset.state = "idle";
    }
  });
})();

// Knowledge: upload each chosen file as its own request, with a progress bar, then follow its ingest job.
(function () {
  const form = document.getElementById("upload");
  if (!form) return;
  const list = document.getElementById("uploads");
  const csrf = form.querySelector("input[name=csrf]").value;

  function follow(jobId, status) {
    fetch(form.dataset.jobs + encodeURIComponent(jobId), {credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (job) {
        if (job.status === "queued" || job.status === "running") {
          status.textContent = "indexing…";
          setTimeout(function () { follow(jobId, status); }, 400);
          return;
        }
        const failed = (job.items || []).filter(function (i) { return i.status === "failed"; });
        if (failed.length) {
          status.className = "error";
          status.textContent = "failed: " + failed.map(function (i) { return i.error ? i.error.detail : i.source; }).join("; ");
        } else {
          status.className = "ok";
          status.textContent = "indexed: " + job.chunks + " chunks";
        }
      });
  }

  function send(file) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = file.name + " ";
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = 0;
    bar.setAttribute("aria-label", "Upload of " + file.name);
    const status = document.createElement("span");
    status.textContent = " uploading…";
    li.append(name, bar, status);
    list.appendChild(li);
    const data = new FormData();
    data.append("csrf", csrf);
    data.append("files", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) bar.value = Math.round(100 * e.loaded / e.total);
    });
    xhr.addEventListener("load", function () {
      if (xhr.status === 202) {
        bar.value = 100;
        follow(JSON.parse(xhr.responseText).id, status);
      } else {
        status.className = "error";
        const doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
        const why = doc.querySelector(".error");
        status.textContent = " " + (why ? why.textContent : "upload failed (" + xhr.status + ")");
      }
    });
    xhr.send(data);
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const input = form.querySelector("input[type=file]");
    for (const file of input.files) send(file);
    input.value = "";
  });
})();
