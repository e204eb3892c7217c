// The fine-tuning jobs page: every job of `/v1/fine_tuning/jobs` (newest first) with its
// status and a loss curve from its metrics events (`/v1/fine_tuning/jobs/{id}/events`,
// type "metrics", data {step, total_steps, train_loss, valid_loss?}; the validation loss
// before training is a message event, plotted at step 0). Jobs still queued,
// validating or running are read again every REFRESH_MS; finished ones once.
"use strict";

(function () {
  const { el, getJson, formatNumber, formatTime, linePlot } = window.Stamen;
  const REFRESH_MS = 5000;
  const MAX_EVENT_PAGES = 50; // 100 events a page: a long job's whole curve
  const ACTIVE = new Set(["queued", "validating_files", "running"]);
  // The job's message event with the validation loss measured before the first step.
  const BEFORE_TRAINING = /^valid_loss before training: (\S+)/;
  const eventsOf = new Map(); // job id -> events, oldest first (finished jobs stay cached)

  async function allJobs() {
    const jobs = [];
    let after = null;
    for (let page = 0; page < 20; page++) {
      const query = "?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
      const body = await getJson("/v1/fine_tuning/jobs" + query);
      jobs.push(...body.data);
      if (!body.has_more || !body.data.length) break;
      after = body.data[body.data.length - 1].id;
    }
    return jobs;
  }

  async function allEvents(jobId) {
    const events = [];
    let after = null;
    for (let page = 0; page < MAX_EVENT_PAGES; page++) {
      const query = "?limit=100" + (after ? "&after=" + encodeURIComponent(after) : "");
      const body = await getJson(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events${query}`);
      events.push(...body.data);
      if (!body.has_more || !body.data.length) break;
      after = body.data[body.data.length - 1].id;
    }
    return events.reverse();
  }

  function lossSeries(events) {
    const train = [];
    const valid = [];
    for (const event of events) {
      const before = BEFORE_TRAINING.exec(event.message || "");
      if (before && Number.isFinite(parseFloat(before[1]))) valid.push([0, parseFloat(before[1])]);
      const data = event.data;
      if (event.type !== "metrics" || !data || !Number.isFinite(data.step)) continue;
      if (Number.isFinite(data.train_loss)) train.push([data.step, data.train_loss]);
      if (Number.isFinite(data.valid_loss)) valid.push([data.step, data.valid_loss]);
    }
    const series = [{ name: "training loss", points: train, cls: "series-train" }];
    if (valid.length) series.push({ name: "validation loss", points: valid, cls: "series-valid" });
    return series;
  }

  function detail(term, value) {
    return [el("dt", {}, term), el("dd", {}, value === null || value === undefined || value === "" ? "—" : value)];
  }

  function jobCard(job, events) {
    const h = job.hyperparameters || {};
    const card = el("section", { class: "card job", "data-job-id": job.id, "aria-labelledby": "job-" + job.id },
      el("div", { class: "model-head" },
        el("h2", { id: "job-" + job.id }, job.user_provided_suffix || job.id),
        el("span", { class: "badge job-" + job.status, "data-testid": "job-status" }, job.status.replaceAll("_", " "))),
      el("dl", { class: "details" },
        ...detail("Job", job.id),
        ...detail("Base model", job.model),
        ...detail("Fine-tuned model", job.fine_tuned_model),
        ...detail("Created", formatTime(job.created_at)),
        ...detail("Finished", job.finished_at ? formatTime(job.finished_at) : null),
        ...detail("Trained tokens", job.trained_tokens === null ? null : formatNumber(job.trained_tokens, 0)),
        ...detail("Hyperparameters",
          `epochs ${h.n_epochs ?? "auto"} · batch ${h.batch_size ?? "auto"} · lr × ${h.learning_rate_multiplier ?? "auto"}`)),
    );
    if (job.error && job.error.message) {
      card.append(el("p", { class: "alert", role: "alert" }, job.error.code ? `${job.error.code}: ${job.error.message}` : job.error.message));
    }
    const series = lossSeries(events);
    const steps = series[0].points.length;
    card.append(el("h3", {}, "Loss"));
    const plot = el("div", { class: "plot", "data-testid": "loss-plot" });
    card.append(plot);
    linePlot(plot, series, {
      label: `Loss curve of ${job.id}`,
      yLabel: "loss",
      xLabel: "step",
      xFormat: (v) => formatNumber(v, 0),
      yFormat: (v) => formatNumber(v, 2),
      yZero: false,
      empty: ACTIVE.has(job.status) ? "No steps reported yet." : "This job reported no steps.",
    });
    const latest = events.filter((e) => e.type === "metrics").pop();
    if (latest) card.append(el("p", { class: "muted small" }, latest.message));
    else if (steps === 0 && events.length) card.append(el("p", { class: "muted small" }, events[events.length - 1].message));
    return card;
  }

  function emptyState() {
    return el("section", { class: "card empty-state", "data-testid": "no-jobs" },
      el("h2", {}, "No fine-tuning jobs exist yet"),
      el("p", {}, "Upload a JSONL training file to ", el("code", {}, "/v1/files"),
        " (purpose fine-tune) and create a job at ", el("code", {}, "/v1/fine_tuning/jobs"),
        ", for example with the openai SDK pointed at this server. Jobs appear here with their loss curves."));
  }

  async function refresh() {
    const status = document.getElementById("jobs-status");
    try {
      const jobs = await allJobs();
      for (const job of jobs) {
        if (!eventsOf.has(job.id) || ACTIVE.has(job.status) || !eventsOf.get(job.id).final) {
          const events = await allEvents(job.id);
          events.final = !ACTIVE.has(job.status);
          eventsOf.set(job.id, events);
        }
      }
      const container = document.getElementById("jobs");
      container.replaceChildren(...(jobs.length ? jobs.map((j) => jobCard(j, eventsOf.get(j.id))) : [emptyState()]));
      const active = jobs.filter((j) => ACTIVE.has(j.status)).length;
      status.textContent = `${jobs.length} job${jobs.length === 1 ? "" : "s"}` +
        (active ? `, ${active} in progress` : "") + " · updated " + new Date().toLocaleTimeString("en-GB");
      status.classList.remove("error");
    } catch (error) {
      status.textContent = "Cannot read the jobs: " + error.message;
      status.classList.add("error");
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    for (;;) {
      if (!document.hidden) await refresh();
      await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));
    }
  });
})();
