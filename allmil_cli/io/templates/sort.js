(function(){
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():v;}
function sortBy(th,desc){var t=th.closest('table'),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
var rows=Array.prototype.slice.call(b.rows);rows.sort(function(r,s){var x=key(r.cells[i]),y=key(s.cells[i]),nx=parseFloat(x),ny=parseFloat(y);
var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:(isNaN(nx)!==isNaN(ny)?(isNaN(nx)?1:-1):x.localeCompare(y));return desc?-c:c;});
rows.forEach(function(r){b.appendChild(r);});t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',desc?'descending':'ascending');}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
sortBy(th,th.getAttribute('aria-sort')==='ascending');});});
var m=/^#sort=([a-z_]+)(-desc)?$/.exec(location.hash);if(m){var th=document.querySelector('table.sortable th[data-key="'+m[1]+'"]');if(th)sortBy(th,!!m[2]);}
})();
