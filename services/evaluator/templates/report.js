(function () {
  var data = JSON.parse(document.getElementById('explorer-data').textContent);
  var stepSel = document.getElementById('explorer-step');
  var layerSel = document.getElementById('explorer-layer');
  var out = document.getElementById('explorer-view');
  function option(sel, value) {
    var o = document.createElement('option');
    o.value = String(value); o.textContent = String(value); sel.appendChild(o);
  }
  data.steps.forEach(function (s) { option(stepSel, s); });
  data.layers.forEach(function (l) { option(layerSel, l); });
  stepSel.value = String(data.steps[data.steps.length - 1]);
  function cell(tag, text) {
    var c = document.createElement(tag); c.textContent = text; return c;
  }
  function table(head, rows) {
    var t = document.createElement('table'), tr = document.createElement('tr');
    head.forEach(function (h) { tr.appendChild(cell('th', h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = document.createElement('tr');
      r.forEach(function (v) { row.appendChild(cell('td', v)); });
      t.appendChild(row);
    });
    return t;
  }
  function fmt(v) { return typeof v === 'number' ? v.toPrecision(4) : String(v); }
  function show() {
    out.textContent = '';
    var c = data.cells[stepSel.value + '/' + layerSel.value];
    if (!c) { out.appendChild(cell('p', 'not extracted at this checkpoint')); return; }
    out.appendChild(cell('h3', 'Activation statistics'));
    out.appendChild(table(Object.keys(c.stats),
      [Object.keys(c.stats).map(function (k) { return fmt(c.stats[k]); })]));
    if (!c.features) {
      out.appendChild(cell('p', 'no SAE for this layer'));
      return;
    }
    out.appendChild(cell('h3', 'Most active SAE features and their top probe tokens'));
    var rows = [];
    c.features.forEach(function (f) {
      f.top_tokens.forEach(function (t, i) {
        rows.push([i ? '' : f.feature, i ? '' : fmt(f.mean_activation),
          i ? '' : fmt(f.frequency), JSON.stringify(t.token), t.context,
          fmt(t.activation)]);
      });
    });
    out.appendChild(table(['feature', 'mean act.', 'frequency', 'token', 'context before',
      'activation'], rows));
  }
  stepSel.addEventListener('change', show);
  layerSel.addEventListener('change', show);
  show();
})();
