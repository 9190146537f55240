// Overview charts (uPlot). The data comes from a data attribute (no inline script: strict CSP).
(function () {
  var holder = document.getElementById("chart-data");
  if (!holder || typeof uPlot === "undefined") return;
  var d = JSON.parse(holder.getAttribute("data-chart"));
  function size(el) { return { width: Math.max(300, el.clientWidth), height: 220 }; }
  function draw(id, series, data) {
    var el = document.getElementById(id);
    var s = size(el);
    new uPlot({
      width: s.width, height: s.height,
      scales: { x: { time: true } },
      series: [{}].concat(series),
      axes: [{}, { size: 50 }],
    }, [d.hours].concat(data), el);
  }
  draw("chart-throughput", [
    { label: "instances stored", stroke: "#2f6fb0", fill: "rgba(47,111,176,0.12)", width: 2 },
    { label: "studies scored", stroke: "#1e7b45", width: 2, dash: [6, 4] },
  ], [d.instances, d.scored]);
  draw("chart-latency", [
    { label: "job p50", stroke: "#6b7785", width: 2, dash: [6, 4] },
    { label: "job p95", stroke: "#8a5a00", width: 2 },
    { label: "received→delivered p50", stroke: "#2f6fb0", width: 2, dash: [6, 4] },
    { label: "received→delivered p95", stroke: "#a4262c", width: 2 },
  ], [d.job_p50, d.job_p95, d.latency_p50, d.latency_p95]);
})();
