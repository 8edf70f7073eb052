(function () {
  // The explorer: its data is the JSON block above (services/evaluator/explorer.py).
  // Every string from the run goes into textContent, never into markup.
  var data = JSON.parse(document.getElementById('explorer-data').textContent);
  var SVG = 'http://www.w3.org/2000/svg';
  var stepSel = document.getElementById('explorer-step');
  var layerSel = document.getElementById('explorer-layer');
  var out = document.getElementById('explorer-view');
  function el(tag, text, cls) {
    var c = document.createElement(tag);
    if (text !== undefined) c.textContent = text;
    if (cls) c.className = cls;
    return c;
  }
  function option(sel, value, label) {
    var o = el('option', label === undefined ? String(value) : label);
    o.value = String(value); sel.appendChild(o);
  }
  function fmt(v) {
    if (typeof v !== 'number') return String(v);
    return Number.isInteger(v) ? String(v) : v.toPrecision(4);
  }
  function pct(v) { return (100 * v).toFixed(v < 0.001 && v > 0 ? 3 : 1) + '%'; }
  function table(head, rows) {
    var t = el('table'), tr = el('tr');
    head.forEach(function (h) { tr.appendChild(el('th', h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el('tr');
      r.forEach(function (v) {
        var td = el('td');
        if (v instanceof Node) td.appendChild(v); else td.textContent = fmt(v);
        row.appendChild(td);
      });
      t.appendChild(row);
    });
    return t;
  }
  function featureLink(key) {
    var a = el('a', 'L' + key.replace('/', ' F'));
    a.href = '#feature-panel'; a.className = 'feature-link';
    if (data.features && data.features[key]) {
      a.addEventListener('click', function (e) { e.preventDefault(); showFeature(key); });
    } else { a.removeAttribute('href'); a.title = 'not among the features shown'; }
    return a;
  }

  function showCell() {
    out.textContent = '';
    var c = data.cells[stepSel.value + '/' + layerSel.value];
    if (!c) { out.appendChild(el('p', 'not extracted at this checkpoint')); return; }
    out.appendChild(el('h3', 'Activation statistics'));
    var keys = Object.keys(c.stats);
    out.appendChild(table(keys, [keys.map(function (k) { return c.stats[k]; })]));
    if (!c.features) { out.appendChild(el('p', 'no SAE for this layer')); return; }
    var sae = data.saes[layerSel.value];
    out.appendChild(el('h3', 'Most active SAE features at this checkpoint'));
    out.appendChild(el('p', 'The SAE of layer ' + layerSel.value + ' was trained at checkpoint ' +
      sae.step + '; here it is applied to the hidden states of checkpoint ' + stepSel.value + '.'));
    out.appendChild(table(['feature', 'mean activation', 'density'], c.features.map(function (f) {
      return [featureLink(layerSel.value + '/' + f.feature), f.mean_activation, pct(f.density)];
    })));
  }

  function svg(width, height) {
    var s = document.createElementNS(SVG, 'svg');
    s.setAttribute('width', width); s.setAttribute('height', height);
    s.setAttribute('class', 'chart');
    return s;
  }
  function shape(parent, tag, attrs, title) {
    var n = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { n.setAttribute(k, attrs[k]); });
    if (title) { var t = document.createElementNS(SVG, 'title'); t.textContent = title; n.appendChild(t); }
    parent.appendChild(n);
    return n;
  }
  function histogram(h) {
    var w = 360, hgt = 110, pad = 14, s = svg(w, hgt + pad + 16), n = h.counts.length;
    var top = Math.max.apply(null, h.counts.concat([1])), bw = w / n;
    h.counts.forEach(function (c, i) {
      var bh = hgt * c / top, lo = h.max * i / n, hi = h.max * (i + 1) / n;
      shape(s, 'rect', {x: i * bw + 1, y: pad + hgt - bh, width: bw - 2, height: bh, fill: '#4a7ab5'},
        c + ' tokens in [' + fmt(lo) + ', ' + fmt(hi) + ')');
    });
    shape(s, 'text', {x: 4, y: 10, 'font-size': 10}).textContent = fmt(top) + ' tokens';
    shape(s, 'text', {x: 0, y: pad + hgt + 13, 'font-size': 10}).textContent = '0';
    shape(s, 'text', {x: w, y: pad + hgt + 13, 'font-size': 10, 'text-anchor': 'end'}).textContent = fmt(h.max);
    return s;
  }
  function trajectoryChart(points, at) {
    var w = 360, hgt = 110, pad = 14, s = svg(w, hgt + pad + 16);
    var top = Math.max.apply(null, points.map(function (p) { return p.mean; }).concat([1e-12]));
    var last = points[points.length - 1].step || 1;
    var margin = 6;  // the end points' circles stay inside the chart
    var xy = points.map(function (p) {
      return [margin + (w - 2 * margin) * p.step / last, pad + hgt - hgt * p.mean / top];
    });
    shape(s, 'line', {x1: 0, y1: pad + hgt, x2: w, y2: pad + hgt, stroke: '#999'});  // 0
    shape(s, 'line', {x1: 0, y1: pad, x2: w, y2: pad, stroke: '#ddd'});  // the top label's
    shape(s, 'polyline', {points: xy.map(function (q) { return q.join(','); }).join(' '),
      fill: 'none', stroke: '#4a7ab5', 'stroke-width': 2});
    points.forEach(function (p, i) {
      shape(s, 'circle', {cx: xy[i][0], cy: xy[i][1], r: p.step === at ? 5 : 3,
        fill: p.step === at ? '#c62828' : '#4a7ab5'}, 'step ' + p.step + ': mean ' + fmt(p.mean));
    });
    shape(s, 'text', {x: 4, y: 10, 'font-size': 10}).textContent =
      'mean activation (top line ' + fmt(top) + ', bottom 0)';
    shape(s, 'text', {x: 0, y: pad + hgt + 13, 'font-size': 10}).textContent = 'step 0';
    shape(s, 'text', {x: w, y: pad + hgt + 13, 'font-size': 10, 'text-anchor': 'end'}).textContent = 'step ' + last;
    return s;
  }
  function contextCell(c) {
    var span = el('span', null, 'context');
    span.appendChild(el('span', c.left.join(''), 'left'));
    span.appendChild(el('mark', c.token));
    span.appendChild(el('span', c.right.join(''), 'right'));
    return span;
  }

  var panel = document.getElementById('feature-panel');
  function showFeature(key, quiet) {
    var f = data.features[key], sae = data.saes[String(f.layer)];
    panel.textContent = '';
    panel.setAttribute('data-feature', key);
    panel.appendChild(el('h3', 'Layer ' + f.layer + ', feature ' + f.feature));
    panel.appendChild(el('p', 'SAE of layer ' + f.layer + ' (' + sae.arch + ', ' + sae.d_sae +
      ' features), trained at checkpoint ' + sae.step + '; everything below but the trajectory ' +
      'is at that checkpoint. Density ' + pct(f.density) + ' of the probe tokens, mean activation ' +
      fmt(f.mean_activation) + '.'));
    panel.appendChild(el('h4', 'Activation histogram'));
    panel.appendChild(histogram(f.histogram));
    panel.appendChild(el('p', 'The ' + f.histogram.active + ' probe tokens where it fires, in ' +
      f.histogram.counts.length + ' bins from 0 to its largest activation; tokens where it is ' +
      'zero are left out.', 'note'));
    panel.appendChild(el('h4', 'Top activating contexts'));
    panel.appendChild(table(['activation', 'context (token highlighted)', 'occurrences', 'example'],
      f.contexts.map(function (c) { return [c.activation, contextCell(c), c.count, c.example]; })));
    panel.appendChild(el('p', 'Ties are one example: probe tokens with the same token and the ' +
      'same activation are listed once (the first of them) with their number.', 'note'));
    panel.appendChild(el('h4', 'Output tokens'));
    if (f.promoted) {
      panel.appendChild(el('p', 'Direct effect on the logits of one unit of activation: the ' +
        'decoder direction, centred and multiplied by the final layer norm\'s scale, through ' +
        'the unembedding of checkpoint ' + sae.step + ' (relative values: the layer norm\'s ' +
        'division by each token\'s spread is left out; later blocks are bypassed), ranked ' +
        'among the tokens the probe\'s texts use: the rest of the vocabulary is untrained here.',
        'note'));
      var rows = f.promoted.map(function (p, i) {
        var s = f.suppressed[i] || ['', ''];
        return [JSON.stringify(p[0]), p[1], JSON.stringify(s[0]), s[1]];
      });
      panel.appendChild(table(['promoted', 'effect', 'suppressed', 'effect'], rows));
    } else { panel.appendChild(el('p', sae.logit_note || 'no logit effects', 'absent')); }
    panel.appendChild(el('h4', 'Trajectory across checkpoints'));
    panel.appendChild(el('p', 'The SAE of checkpoint ' + sae.step + ' (red) applied to the ' +
      'hidden states of every extracted checkpoint: where a feature is flat at zero early, ' +
      'its direction does not exist yet.', 'note'));
    panel.appendChild(trajectoryChart(f.trajectory, sae.step));
    panel.appendChild(table(['step', 'mean activation', 'density', 'max'],
      f.trajectory.map(function (t) { return [t.step, t.mean, pct(t.density), t.max]; })));
    panel.appendChild(el('h4', 'Nearest features in the adjacent layers'));
    var near = f.neighbours || {};
    var nearRows = [];
    Object.keys(near).forEach(function (layer) {
      near[layer].forEach(function (pair) {
        nearRows.push(['layer ' + layer, featureLink(layer + '/' + pair[0]), pair[1]]);
      });
    });
    panel.appendChild(nearRows.length ? table(['layer', 'feature', 'decoder cosine'], nearRows)
      : el('p', 'no SAE in an adjacent layer'));
    if (!quiet) panel.scrollIntoView();
  }

  var keys = Object.keys(data.features || {});
  var featureSel = document.getElementById('feature-select');
  var search = document.getElementById('feature-search');
  var results = document.getElementById('feature-results');
  // "L1/5", "1:5" or "F5" name a feature; a plain number is a feature id *and* a token
  // (with the numbers tokenizer most tokens are numbers), ids first; anything else a token.
  function find(query) {
    var q = query.trim(), id = /^(?:L?(\d+)\s*[\/:]\s*F?|F)?(\d+)$/i.exec(q);
    var found = [];
    if (id) {
      found = keys.filter(function (k) {
        var f = data.features[k];
        return String(f.feature) === id[2] && (id[1] === undefined || String(f.layer) === id[1]);
      });
      if (!/^\d+$/.test(q)) return found;
    }
    var needle = q.toLowerCase(), best = {};
    keys.forEach(function (k) {
      data.features[k].contexts.forEach(function (c) {
        if (needle && c.token.trim().toLowerCase() === needle) {
          best[k] = Math.max(best[k] || 0, c.activation);
        }
      });
    });
    Object.keys(best).sort(function (a, b) { return best[b] - best[a]; }).forEach(function (k) {
      if (found.indexOf(k) < 0) found.push(k);
    });
    return found;
  }
  function runSearch() {
    results.textContent = '';
    // the address holds the search, so the link shares it (replaceState: no jump, no history)
    history.replaceState(null, '', '#search=' + encodeURIComponent(search.value));
    var found = find(search.value);
    if (!found.length) {
      results.appendChild(el('p', 'no shown feature has id or top token "' + search.value + '"'));
      return;
    }
    results.appendChild(el('span', found.length + ' match' + (found.length > 1 ? 'es' : '') + ': '));
    found.forEach(function (k) { results.appendChild(featureLink(k)); results.appendChild(el('span', ' ')); });
    showFeature(found[0]);
  }

  data.steps.forEach(function (s) { option(stepSel, s); });
  data.layers.forEach(function (l) { option(layerSel, l); });
  stepSel.value = String(data.steps[data.steps.length - 1]);
  stepSel.addEventListener('change', showCell);
  layerSel.addEventListener('change', showCell);
  showCell();
  if (featureSel) {
    keys.forEach(function (k) {
      var f = data.features[k];
      option(featureSel, k, 'layer ' + f.layer + ' feature ' + f.feature + ' (density ' + pct(f.density) + ')');
    });
    featureSel.addEventListener('change', function () { showFeature(featureSel.value); });
    document.getElementById('feature-search-form').addEventListener('submit', function (e) {
      e.preventDefault(); runSearch();
    });
    // A search in the page's address (report.html#search=12) runs on load: links can share it.
    function searchFromAddress() {
      var hash = /[#&]search=([^&]*)/.exec(window.location.hash);
      if (hash) { search.value = decodeURIComponent(hash[1]); runSearch(); }
      return Boolean(hash);
    }
    window.addEventListener('hashchange', searchFromAddress);
    if (!searchFromAddress() && keys.length) showFeature(keys[0], true);
  }
})();
