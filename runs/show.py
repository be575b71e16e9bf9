import json,glob,os,sys
import numpy as np
for f in sorted(glob.glob('runs/routers-bg/cache/' + (sys.argv[1] if len(sys.argv) > 1 else 'words') + '*.json')):
    d=json.load(open(f)); print(os.path.basename(f), round(d['seconds']))
    print(" seen", [round(x) for x in d['seen']]); print(" held", [round(x) for x in d.get('heldout', [])])
    if d['routing']:
        r=d['routing'][-1]; print(" gap", np.round(np.subtract(r['within'],r['between']),2), "probe", np.round(r['probe'],2))
