// The Annotate tab's token view in the browser (gr.HTML's js_on_load: `element` is the component,
// `trigger(name, data)` sends a custom event to Python).
//
// The selection lives in the browser (no round trip per mouse move, so long conversations stay
// responsive): a click picks a token, shift-click or drag extends within its turn. The snapped
// preview is the highlighted tokens; the chosen range goes to Python as UTF-16 offsets.
const root = element;
let anchor = null, sel = null, dragging = false;
function turnTokens(t) { return Array.from(root.querySelectorAll('.tok[data-t="' + t + '"]')); }
function paint() {
  root.querySelectorAll('.tok.sel').forEach(x => x.classList.remove('sel'));
  if (!sel) return;
  turnTokens(sel.turn).forEach(x => { const k = +x.dataset.k; if (k >= sel.k1 && k <= sel.k2) x.classList.add('sel'); });
}
function extend(tok) {
  const t = +tok.dataset.t, k = +tok.dataset.k;
  if (!anchor || anchor.turn !== t) anchor = {turn: t, k: k};
  const k1 = Math.min(anchor.k, k), k2 = Math.max(anchor.k, k);
  let a = Infinity, b = -Infinity;
  turnTokens(t).forEach(x => { const kk = +x.dataset.k; if (kk >= k1 && kk <= k2) {
    a = Math.min(a, +x.dataset.a); b = Math.max(b, +x.dataset.b); } });
  sel = {turn: t, a: a, b: b, k1: k1, k2: k2};
  paint();
}
root.addEventListener('mousedown', e => {
  const tok = e.target.closest('.tok');
  if (!tok) return;
  e.preventDefault();  // no text selection; but a box or radio that had focus loses it, as on any click
  // outside it, so that the keys that follow label the selection instead of going to that box
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
  if (!(e.shiftKey && anchor)) anchor = {turn: +tok.dataset.t, k: +tok.dataset.k};
  dragging = true;
  extend(tok);
});
root.addEventListener('mouseover', e => {
  if (!dragging) return;
  const tok = e.target.closest('.tok');
  if (tok && +tok.dataset.t === anchor.turn) extend(tok);
});
root.addEventListener('keydown', e => {  // the pager's "turn #" box
  const box = e.target.closest('input.goto');
  if (box && e.key === 'Enter' && box.value !== '') { trigger('hsa_page', {turn: +box.value}); e.preventDefault(); box.blur(); }
});
new MutationObserver(() => {  // a turn asked for by number: scroll to it once it is shown
  const wrap = root.querySelector('.hsa-annot');
  const focus = wrap ? wrap.dataset.focus : undefined;
  if (focus !== undefined && focus !== root.__hsaFocus) {
    const turn = wrap.querySelector('.turn[data-t="' + focus + '"]');
    if (turn) turn.scrollIntoView({block: 'center'});
  }
  root.__hsaFocus = focus;
}).observe(root, {childList: true, subtree: true});
root.addEventListener('mouseup', () => { if (dragging) { dragging = false; if (sel) trigger('hsa_select', sel); } });
root.addEventListener('click', e => {
  const pg = e.target.closest('button[data-page]');
  if (pg) { if (!pg.disabled) trigger('hsa_page', {page: +pg.dataset.page}); return; }
  const button = e.target.closest('button[data-role]');
  if (!button) return;
  if (button.classList.contains('tb')) { trigger('hsa_turn_role', {turn: +button.dataset.t, role: +button.dataset.role}); return; }
  if (!sel) return;
  if (button.dataset.role === 'clear') trigger('hsa_clear', sel);
  else trigger('hsa_label', Object.assign({}, sel, {role: +button.dataset.role}));
  sel = null; anchor = null;
});
if (window.__hsaAnnotateKeys) document.removeEventListener('keydown', window.__hsaAnnotateKeys);
window.__hsaAnnotateKeys = e => {
  const target = e.target;
  if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
  if (!root.offsetParent) return;  // the tab is not shown
  const digit = (e.code || '').startsWith('Digit') ? e.code.slice(5) : e.key;
  if ((e.ctrlKey || e.metaKey) && (e.key === 'z' || e.key === 'Z' || e.key === 'y')) {
    trigger((e.key === 'y' || e.shiftKey) ? 'hsa_redo' : 'hsa_undo', {}); e.preventDefault(); return;
  }
  if (e.key === 'Escape') { sel = null; anchor = null; paint(); return; }
  if ((e.key === '[' || e.key === ']') && !e.ctrlKey && !e.metaKey && !e.altKey) {  // previous / next page
    const to = root.querySelector('button.pg[title^="' + (e.key === '[' ? 'previous' : 'next') + '"]');
    if (to && !to.disabled) trigger('hsa_page', {page: +to.dataset.page});
    e.preventDefault(); return;
  }
  if (!sel) return;
  if (['1', '2', '3'].includes(digit)) {
    const role = +digit - 1;
    if (e.shiftKey) trigger('hsa_turn_role', {turn: sel.turn, role: role});
    else trigger('hsa_label', Object.assign({}, sel, {role: role}));
  } else if (digit === '0' || e.key === 'Delete' || e.key === 'Backspace') {
    trigger('hsa_clear', sel);
  } else return;
  e.preventDefault();
  sel = null; anchor = null;
};
document.addEventListener('keydown', window.__hsaAnnotateKeys);
